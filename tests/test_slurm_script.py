"""scripts/slurm_train.sh: valid bash, and the torchrun command it renders for fake 1- and 2-node allocations."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest

from .conftest import REPO

SCRIPT = REPO / "scripts" / "slurm_train.sh"


def fake_scontrol(bin_dir: Path, hosts: list[str]) -> None:
    """``scontrol show hostnames LIST`` answering with ``hosts``; anything else is an error."""
    script = bin_dir / "scontrol"
    lines = "\\n".join(hosts)
    script.write_text(
        "#!/usr/bin/env bash\n"
        '[[ "$1 $2" == "show hostnames" && -n "$3" ]] || { echo "unexpected: $*" >&2; exit 1; }\n'
        f'printf "{lines}\\n"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def render(tmp_path: Path, hosts: list[str], slurm: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake_scontrol(bin_dir, hosts)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": os.environ.get("HOME", "/tmp"),
        "XRAY_SLURM_DRY_RUN": "1",
        "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_JOB_ID": "4242",
        **slurm,
    }
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=30, check=False)


def parse(command: str) -> tuple[list[str], list[str], list[str]]:
    """(srun part, torchrun options, xray arguments)."""
    words = shlex.split(command)
    run_at = words.index("torch.distributed.run")
    module_at = words.index("-m", run_at)
    assert words[module_at + 1 : module_at + 3] == ["xray", "train"]
    return words[: run_at - 1], words[run_at + 1 : module_at], words[module_at + 3 :]


def options(words: list[str]) -> dict[str, str]:
    return dict(w[2:].split("=", 1) for w in words if w.startswith("--") and "=" in w)


def test_script_is_valid_bash_with_sbatch_headers() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, check=False).returncode == 0
    text = SCRIPT.read_text()
    for header in ("--nodes=", "--gpus-per-node=", "--cpus-per-task=", "--time=", "--mem="):
        assert f"#SBATCH {header}" in text, header


@pytest.mark.parametrize(
    "hosts, slurm, nnodes, nproc",
    [
        (["gpu-a01"], {"SLURM_JOB_NODELIST": "gpu-a01", "SLURM_NNODES": "1", "SLURM_GPUS_ON_NODE": "4"}, "1", "4"),
        (["gpu-a01", "gpu-a02"], {"SLURM_JOB_NODELIST": "gpu-a[01-02]", "SLURM_NNODES": "2", "SLURM_GPUS_PER_NODE": "h100:8"}, "2", "8"),
        (["cpu-07", "cpu-08"], {"SLURM_JOB_NODELIST": "cpu-[07-08]", "SLURM_NNODES": "2", "SLURM_CPUS_PER_TASK": "16"}, "2", "16"),
    ],
)
def test_rendered_command(tmp_path: Path, hosts: list[str], slurm: dict[str, str], nnodes: str, nproc: str) -> None:
    result = render(tmp_path, hosts, slurm, "--data", "/shared/covid data", "--set", "trainer.epochs=3")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 1
    srun, torchrun, xray_args = parse(result.stdout)
    assert srun[0] == "srun"
    srun_opts = options(srun)
    assert srun_opts["nodes"] == nnodes and srun_opts["ntasks-per-node"] == "1"
    assert srun_opts["chdir"] == str(REPO)
    assert srun[-1].endswith("python")
    opts = options(torchrun)
    assert opts["nnodes"] == nnodes
    assert opts["nproc_per_node"] == nproc
    assert opts["rdzv_backend"] == "c10d"
    assert opts["rdzv_endpoint"] == f"{hosts[0]}:29500"
    assert opts["rdzv_id"] == "4242"
    assert opts["max_restarts"] == "0"
    assert xray_args == ["--data", "/shared/covid data", "--set", "trainer.epochs=3"], "arguments pass through intact"


def test_overrides_and_missing_allocation(tmp_path: Path) -> None:
    slurm = {"SLURM_JOB_NODELIST": "n1", "SLURM_NNODES": "1", "SLURM_GPUS_ON_NODE": "2",
             "XRAY_NPROC_PER_NODE": "1", "XRAY_RDZV_PORT": "31000"}
    _, torchrun, _ = parse(render(tmp_path, ["n1"], slurm).stdout)
    assert options(torchrun)["nproc_per_node"] == "1"
    assert options(torchrun)["rdzv_endpoint"] == "n1:31000"
    outside = render(tmp_path, ["n1"], {})
    assert outside.returncode == 2 and "SLURM_JOB_NODELIST is not set" in outside.stderr
