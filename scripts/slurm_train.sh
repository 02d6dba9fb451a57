#!/usr/bin/env bash
#SBATCH --job-name=xray-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1        # one torchrun agent per node; it starts one worker per GPU
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --mem=128G
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%x-%j.out
#
# Distributed `xray train` across the allocated nodes: srun starts one torchrun per
# node, and the torchruns meet (c10d rendezvous) on the first node of the allocation.
#
#   sbatch scripts/slurm_train.sh --data s3://bucket/covid --set trainer.epochs=30
#   sbatch --nodes=1 --gpus-per-node=2 scripts/slurm_train.sh --data /shared/covid
#
# Everything after the script name goes to `xray train`. Submit from the repository
# root: the environment is $XRAY_VENV (default: .venv there), and artifacts_dir must
# be on a filesystem every node sees (rank 0 writes the run; every rank reads the
# cached arrays from it).
#
# Knobs (environment):
#   XRAY_SLURM_DRY_RUN=1     print the srun/torchrun command and exit, run nothing
#   XRAY_NPROC_PER_NODE=N    processes per node (default: GPUs on the node, else its CPUs)
#   XRAY_RDZV_PORT=P         rendezvous port on the first node (default 29500)
#   XRAY_DIST_TIMEOUT_S=S    a training collective waits at most S seconds (default 900)

set -euo pipefail

REPO="${XRAY_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}"
VENV="${XRAY_VENV:-$REPO/.venv}"
DRY_RUN="${XRAY_SLURM_DRY_RUN:-0}"

die() {
    echo "slurm_train.sh: $*" >&2
    exit 2
}

[[ -n "${SLURM_JOB_NODELIST:-}" ]] || die "SLURM_JOB_NODELIST is not set: submit with sbatch (or set it for a dry run)"

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
(( ${#NODES[@]} > 0 )) || die "scontrol found no hosts in '$SLURM_JOB_NODELIST'"
HEAD_NODE="${NODES[0]}"
NNODES="${SLURM_NNODES:-${#NODES[@]}}"

# GPUs on this node: SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE ("4" or "a100:4").
gpus="${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}"
gpus="${gpus##*:}"
[[ "$gpus" =~ ^[0-9]+$ ]] || gpus=0
if [[ -n "${XRAY_NPROC_PER_NODE:-}" ]]; then
    NPROC="$XRAY_NPROC_PER_NODE"
elif (( gpus > 0 )); then
    NPROC="$gpus"
else
    NPROC="${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-$(nproc)}}"
fi
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "processes per node must be a positive integer, got '$NPROC'"
PORT="${XRAY_RDZV_PORT:-29500}"

if [[ -f "$VENV/bin/activate" ]]; then
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
elif [[ "$DRY_RUN" != "1" ]]; then
    die "no virtual environment at $VENV (set XRAY_VENV)"
fi
PYTHON="$(command -v python || echo "$VENV/bin/python")"
export BENTOML_DO_NOT_TRACK=true

CMD=(
    srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 --chdir="$REPO"
    "$PYTHON" -m torch.distributed.run
    --nnodes="$NNODES"
    --nproc_per_node="$NPROC"
    --rdzv_backend=c10d
    --rdzv_endpoint="$HEAD_NODE:$PORT"
    --rdzv_id="${SLURM_JOB_ID:-xray}"
    --max_restarts=0
    -m xray train "$@"
)

if [[ "$DRY_RUN" == "1" ]]; then
    printf '%q ' "${CMD[@]}"
    printf '\n'
    exit 0
fi

echo "xray: ${NNODES} node(s) x ${NPROC} process(es), rendezvous on ${HEAD_NODE}:${PORT}" >&2
exec "${CMD[@]}"
