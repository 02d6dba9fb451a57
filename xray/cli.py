"""The ``xray`` command: train, inspect runs, write the demo dataset.

Every user error ends as one line on stderr and exit code 2; the full
traceback of an unexpected failure goes to the run's log, not the terminal.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from xray.config import DEFAULT_CONFIG_PATH, load_config
from xray.data.sources import registry
from xray.typed import to_jsonable
from xray.errors import XrayError
from xray.entity.config_entity import PushConfig
from xray.entity.run_summary import RunSummary

logger = logging.getLogger("xray")


def main(argv: list[str] | None = None, after_run: Callable[[], None] | None = None) -> int:
    """``after_run`` is called once ``xray train`` has finished (and sealed) its run, before it prints."""
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    parser = build_parser()
    args = parser.parse_args(argv)
    args.after_run = after_run
    _setup_logging(args.quiet)
    try:
        return args.handler(args)
    except XrayError as exc:
        print(f"xray: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("xray: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `xray runs list | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def build_parser() -> argparse.ArgumentParser:
    from xray import __version__

    parser = XrayArgumentParser(prog="xray", description="Chest X-ray classifier pipeline: train, audit, serve.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("--version", action="version", version=f"xray {__version__}")
    # -q/--quiet is accepted after any subcommand too (`xray train ... -q`).
    quiet_option = argparse.ArgumentParser(add_help=False)
    quiet_option.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_subparser_class(quiet_option))
    for add in (_add_train, _add_runs, _add_models, _add_keys, _add_data):
        add(sub)
    return parser


def _add_train(sub: Any) -> None:
    train = sub.add_parser("train", help="run the whole pipeline and print the run id")
    train.add_argument("--config", default=None, help=f"YAML config (default: {DEFAULT_CONFIG_PATH} if present)")
    train.add_argument("--data", default=None, help=f"dataset URI: {registry.spelled()}")
    train.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="SECTION.KEY=VALUE",
                       help="override config values (one or more pairs, flag repeatable), e.g. --set trainer.epochs=5 trainer.seed=1")
    train.add_argument("--run-id", default=None, help=argparse.SUPPRESS)
    train.set_defaults(handler=cmd_train)


def _add_runs(sub: Any) -> None:
    runs = sub.add_parser("runs", help="list, show and verify runs")
    runs.add_argument("--artifacts", default=None, help="artifacts root (default: from config, else ./artifacts)")
    runs_sub = runs.add_subparsers(dest="runs_command", required=True)
    # --artifacts is accepted after the subcommand too (`xray runs list --artifacts DIR`).
    artifacts_option = argparse.ArgumentParser(add_help=False)
    artifacts_option.add_argument("--artifacts", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    runs_sub.add_parser("list", help="one line per run", parents=[artifacts_option]).set_defaults(handler=cmd_runs_list)
    show = runs_sub.add_parser("show", help="a run's manifest, metrics and chosen model", parents=[artifacts_option])
    show.add_argument("run_id")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=cmd_runs_show)
    verify = runs_sub.add_parser(
        "verify", help="check a run's seal, its ledger entry and every file; exit 1 naming each problem",
        parents=[artifacts_option],
    )
    verify.add_argument("run_id")
    verify.add_argument("--public-key", type=Path, default=None, metavar="PEM",
                        help="the sealing public key (default: the local signing key's, see `xray keys export`)")
    verify.set_defaults(handler=cmd_runs_verify)
    diff = runs_sub.add_parser("diff", help="what differs between two runs", parents=[artifacts_option])
    diff.add_argument("run_a")
    diff.add_argument("run_b")
    diff.add_argument("--json", action="store_true")
    diff.set_defaults(handler=cmd_runs_diff)
    export = runs_sub.add_parser("export", help="export a run to MLflow (again: updates it)", parents=[artifacts_option])
    export.add_argument("run_id")
    export.add_argument("--mlflow", required=True, metavar="URI",
                        help="tracking URI: sqlite:///path.db, a file store folder, or http://host:port")
    export.add_argument("--experiment", default="xray", help="MLflow experiment name (default: xray)")
    export.set_defaults(handler=cmd_runs_export)


def _add_models(sub: Any) -> None:
    models = sub.add_parser("models", help="stored models and the production pointer")
    default_name = PushConfig().model_name
    models.add_argument("--name", default=default_name, help=f"model name (default: {default_name})")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    name_option = argparse.ArgumentParser(add_help=False)
    name_option.add_argument("--name", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    listing = models_sub.add_parser("list", help="versions, runs, gate scores, production", parents=[name_option])
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=cmd_models_list)
    promote = models_sub.add_parser("promote", help="make a gated model production")
    promote.add_argument("tag", help="name:version in the BentoML store")
    promote.add_argument("--reason", required=True)
    promote.set_defaults(handler=cmd_models_promote)
    rollback = models_sub.add_parser("rollback", help="put back the previous production model", parents=[name_option])
    rollback.add_argument("--reason", required=True)
    rollback.set_defaults(handler=cmd_models_rollback)
    audit = models_sub.add_parser("audit", help="the production pointer's audit log", parents=[name_option])
    audit.add_argument("--json", action="store_true")
    audit.set_defaults(handler=cmd_models_audit)


def _add_keys(sub: Any) -> None:
    keys = sub.add_parser("keys", help="the run-sealing key")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    export = keys_sub.add_parser("export", help="print (or write) the public key that verifies sealed runs")
    export.add_argument("--out", type=Path, default=None, help="write the PEM here instead of printing it")
    export.set_defaults(handler=cmd_keys_export)


def _add_data(sub: Any) -> None:
    data = sub.add_parser("data", help="datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    demo = data_sub.add_parser("demo", help="write the synthetic demo dataset (phantoms, not real patients)")
    demo.add_argument("out")
    demo.add_argument("--per-class", type=int, default=100)
    demo.set_defaults(handler=cmd_data_demo)
    upload = data_sub.add_parser("upload", help="upload a local dataset folder to s3://bucket/prefix")
    upload.add_argument("folder")
    upload.add_argument("uri")
    upload.set_defaults(handler=cmd_data_upload)


class XrayArgumentParser(argparse.ArgumentParser):
    """Usage errors keep the one-line ``xray: error: ...`` form (argparse would print the usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"xray: error: {self.prog.removeprefix('xray ')}: {message}\n" if self.prog != "xray"
                  else f"xray: error: {message}\n")


def _subparser_class(*parents: argparse.ArgumentParser) -> type[argparse.ArgumentParser]:
    """Every subcommand parser (and theirs) is an XrayArgumentParser that also takes ``parents``' options."""

    class SubcommandParser(XrayArgumentParser):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["parents"] = [*kwargs.get("parents", ()), *parents]
            super().__init__(*args, **kwargs)

    return SubcommandParser


def cmd_train(args: argparse.Namespace) -> int:
    from xray.pipeline.training_pipeline import run_pipeline

    config_path = args.config or (DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else None)
    config = load_config(config_path, args.overrides, data_uri=args.data)
    result = run_pipeline(config, run_id=args.run_id)
    if args.after_run is not None:
        args.after_run()
    if result.rank != 0:  # a torchrun worker: rank 0 reports the run; a worker only reports its own failure
        if result.status == "failed":
            print(f"xray: error: rank {result.rank}: {result.reason}", file=sys.stderr)
            return 2
        return 0
    print(f"run {result.run_id}: {result.status}")
    if result.status != "succeeded":
        print(f"xray: error: {result.reason}", file=sys.stderr)
        return 2
    assert result.summary is not None
    print(format_summary(result.summary))
    print(f"artifacts: {result.run_path}")
    return 0


def format_summary(summary: RunSummary) -> str:
    lines = [f"{'candidate':<14} {'val AUC':>8} {'val acc':>8} {'test AUC':>9} {'test acc':>9}"]
    for name, m in summary.candidates.items():
        mark = "  <- chosen" if name == summary.best_candidate else ""
        lines.append(
            f"{name:<14} {m.validation['roc_auc']:>8.4f} {m.validation['accuracy']:>8.4f} "
            f"{m.test['roc_auc']:>9.4f} {m.test['accuracy']:>9.4f}{mark}"
        )
    lines += summary.generalization_lines()
    if summary.pushed is not None:
        if summary.pushed:
            lines.append(f"model: pushed as {summary.model_tag}")
        else:
            lines.append(f"model: not pushed ({'; '.join(summary.push_reasons)})")
    return "\n".join(lines)


def _artifacts_root(args: argparse.Namespace) -> Path:
    if args.artifacts:
        return Path(args.artifacts)
    if DEFAULT_CONFIG_PATH.is_file():
        return Path(load_config(DEFAULT_CONFIG_PATH).artifacts_dir)
    return Path("artifacts")


def cmd_runs_list(args: argparse.Namespace) -> int:
    from xray.pipeline.store import list_runs

    runs = list_runs(_artifacts_root(args))
    if not runs:
        print("no runs")
        return 0
    print(f"{'run id':<28} {'status':<10} {'best':<12} {'val AUC':>8} {'test acc':>9}  data")
    for m in runs:
        summary = RunSummary.read(m.summary)
        scores = summary.best_scores()
        auc = f"{scores.validation['roc_auc']:.4f}" if scores else "-"
        acc = f"{scores.test['accuracy']:.4f}" if scores else "-"
        print(f"{m.run_id:<28} {m.status:<10} {summary.best_candidate or '-':<12} {auc:>8} {acc:>9}  {m.data_uri}")
    return 0


def cmd_runs_show(args: argparse.Namespace) -> int:
    from xray.audit.reports import run_report, run_summary

    root = _artifacts_root(args)
    report = run_report(root, args.run_id)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"run {report['run_id']}: {report['status']}" + (f" ({report['reason']})" if report["reason"] else ""))
    print(f"data: {report['data_uri']}   started {report['created_at']}   finished {report['finished_at']}")
    code = report["code"]
    print(f"code: {code.get('git_commit') or 'no git'}{' (dirty)' if code.get('git_dirty') else ''}")
    for stage, record in report["stages"].items():
        cached = f", reused from {record['cached_from']}" if record.get("cached_from") else ""
        print(f"  {stage:<20} {record['status']:<10} {record.get('artifact_id') or '':<34}{cached}")
    if report["candidates"]:
        print(format_summary(run_summary(root, args.run_id)))
    return 0


def cmd_runs_verify(args: argparse.Namespace) -> int:
    """Exit 0: intact; 1: a problem (each named on stdout); 3: the run is still going, not sealed yet."""
    from xray.audit.seal import verify_run

    result = verify_run(_artifacts_root(args), args.run_id, args.public_key)
    if not result.sealed and result.ok:
        print(result.message)
        return 3
    for problem in result.problems:
        print(problem)
    if result.problems:
        print(f"run {args.run_id}: {len(result.problems)} problem(s); do not trust this run", file=sys.stderr)
        return 1
    print(result.message)
    return 0


def cmd_keys_export(args: argparse.Namespace) -> int:
    from xray.audit.keys import load_signing_key

    key = load_signing_key()
    pem = key.public.pem()
    if args.out is None:
        sys.stdout.write(pem.decode())
        return 0
    try:
        args.out.write_bytes(pem)
    except OSError as exc:
        raise XrayError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    print(f"wrote the public key (id {key.public.key_id[:16]}) to {args.out}; the private key stays at {key.path}")
    return 0


def cmd_runs_diff(args: argparse.Namespace) -> int:
    from xray.audit.run_diff import diff_runs, format_diff

    diff = diff_runs(_artifacts_root(args), args.run_a, args.run_b)
    print(json.dumps(to_jsonable(diff), indent=2) if args.json else format_diff(diff))
    return 0


def cmd_runs_export(args: argparse.Namespace) -> int:
    from xray.tracking.mlflow_export import export_run

    result = export_run(_artifacts_root(args), args.run_id, args.mlflow, experiment=args.experiment)
    verb = "created" if result.created else "updated"
    print(f"run {args.run_id}: {verb} MLflow run {result.mlflow_run_id} in experiment {args.experiment!r} at {args.mlflow}")
    if result.model_version is not None:
        alias = f" (alias {', '.join(result.aliases)})" if result.aliases else ""
        print(f"model: {result.model_name} version {result.model_version}{alias}")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from xray.audit.registry import list_models

    rows = list_models(args.name)
    if args.json:
        print(json.dumps(to_jsonable(rows), indent=2))
        return 0
    if not rows:
        print(f"no models named {args.name}")
        return 0
    print(f"{'':2}{'tag':<36} {'created':<26} {'run':<28} {'test AUC':>8} {'test acc':>8}  gate")
    for row in rows:
        auc = "-" if row.test_roc_auc is None else f"{row.test_roc_auc:.4f}"
        acc = "-" if row.test_accuracy is None else f"{row.test_accuracy:.4f}"
        print(f"{'* ' if row.production else '  '}{row.tag:<36} {row.created:<26} {row.run_id or '-':<28} "
              f"{auc:>8} {acc:>8}  {'passed' if row.gate_passed else 'never'}")
    print("* = production")
    return 0


def cmd_models_promote(args: argparse.Namespace) -> int:
    from xray.audit.registry import promote

    entry = promote(args.tag, args.reason)
    print(f"production {entry.model}: {entry.from_tag or '(none)'} -> {entry.to_tag}")
    return 0


def cmd_models_rollback(args: argparse.Namespace) -> int:
    from xray.audit.registry import rollback

    entry = rollback(args.name, args.reason)
    print(f"production {entry.model}: {entry.from_tag} -> {entry.to_tag} (rolled back)")
    return 0


def cmd_models_audit(args: argparse.Namespace) -> int:
    from xray.audit.registry import read_audit_log

    entries = read_audit_log(model=args.name)
    if args.json:
        print(json.dumps(to_jsonable(entries), indent=2))
        return 0
    for e in entries:
        print(f"{e.when}  {e.action:<8} {e.from_tag or '(none)'} -> {e.to_tag}  by {e.who}: {e.reason}")
    if not entries:
        print(f"no production changes recorded for {args.name}")
    return 0


def cmd_data_demo(args: argparse.Namespace) -> int:
    from xray.data.demo_data import generate_demo_dataset

    counts = generate_demo_dataset(Path(args.out), images_per_class=args.per_class)
    print(f"wrote {sum(counts.values())} synthetic images to {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def cmd_data_upload(args: argparse.Namespace) -> int:
    from xray.data.sources.s3 import S3Settings, upload_dir

    folder = Path(args.folder)
    if not folder.is_dir():
        raise XrayError(f"not a folder: {folder}")
    count = upload_dir(folder, args.uri, S3Settings())
    print(f"uploaded {count} files from {folder} to {args.uri}")
    return 0


def _setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    handler.setLevel(logging.WARNING if quiet else logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "matplotlib", "PIL", "bentoml"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
