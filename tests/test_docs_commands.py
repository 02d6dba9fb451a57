"""Every command in README.md and docs/*.md works as written, so the docs cannot drift from the code.

Each command of every fenced ``bash`` block is either run here (offline and quick, in a temporary
folder with a private key, cache and model store) or matched by ``COVERED_ELSEWHERE``, which names
the test that runs it (or says why only a person can); an ``export`` line may only set variables.
A command that is neither fails
``test_every_command_is_run_here_or_covered_elsewhere``: a new command in the docs needs one or
the other. Beyond that, every ``xray`` command shown anywhere must parse with the real CLI, every
``--set`` and every ``section.key`` in a code span must name a real config key, every repository
path and ``xray.module:attr`` must exist, and every ``docs/*.md`` must be listed in the README.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import io
import os
import re
import shlex
import subprocess
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest

from xray.cli import build_parser
from xray.config import load_config
from xray.entity.config_entity import PipelineConfig
from xray.errors import ConfigError

from .conftest import REPO, SHARED

DOCS = (REPO / "README.md", *sorted((REPO / "docs").glob("*.md")))
VENV_BIN = Path(sys.executable).parent
SEPARATORS = {"&&", "||", ";", "|"}


@dataclass(frozen=True)
class DocCommand:
    """One simple command of a fenced bash block: where it is, its leading VAR=value pairs and its words."""

    where: str  # "docs/serving.md:14"
    env: tuple[tuple[str, str], ...]
    argv: tuple[str, ...]

    @property
    def line(self) -> str:
        return " ".join(self.argv)


@dataclass(frozen=True)
class Elsewhere:
    """Commands (``pattern``, a regex matched against the whole command line) that another test covers."""

    pattern: str
    covered_by: str  # "tests/test_x.py::test_y", several joined by " + ", or "by hand: why no test can"


# Commands not run here, each with what covers it. Placeholders in capitals (RUN, DATA, VERSION, ...)
# stand for what the reader fills in.
S3_TRAIN = "tests/test_s3_pipeline_and_gate.py::test_s3_training_records_objects_pushes_and_gates"
ROUND_TRIP = "tests/test_tracking.py::test_bentoml_export_import_round_trip_with_audit_log"
NO_DOCKER = "by hand: needs a Docker engine (none on the dev machines)"
COVERED_ELSEWHERE = (
    Elsewhere(r"make demo", f"by hand: the fresh-clone timing of issue 21; its steps: {S3_TRAIN}"),
    Elsewhere(r"make test", "by hand: it is the whole suite"),
    Elsewhere(r"make test-fast", "by hand: it runs the suite's fast part"),
    Elsewhere(r"\.venv/bin/python -m pytest tests/\S+", "by hand: it runs tests (the paths are checked here)"),
    Elsewhere(r"\.venv/bin/xray train --data \.\./shared/\S+\.npz .*",
              "tests/test_real_data.py::test_pneumoniamnist_simple_cnn_reaches_auc_090"),
    Elsewhere(r"\.venv/bin/xray train --data \.\./shared/datasets/covid19-3class/train",
              "tests/test_dicom.py::test_dicom_folder_trains_end_to_end + "
              "by hand: scripts/bench_time_to_accuracy.py trains on these films (docs/benchmarks.md)"),
    Elsewhere(r"\.venv/bin/xray train --data s3://\S+", S3_TRAIN),
    Elsewhere(r"\.venv/bin/xray data upload \S+ s3://\S+", S3_TRAIN),
    Elsewhere(r"\.venv/bin/xray train (--config \S+ )?--data demo .*",
              "tests/test_pipeline.py::test_train_prints_run_id_and_summary + "
              "tests/test_tracking.py::test_set_takes_several_pairs_and_quiet_goes_after_the_subcommand + "
              "tests/test_time_budget.py::test_a_tiny_budget_is_planned_recorded_and_respected"),
    Elsewhere(r"\.venv/bin/xray train --data DATA --set ingestion\.\S+( --set ingestion\.\S+)?",
              "tests/test_patient_groups.py::test_regex_groups_keep_each_patient_in_one_split + "
              "tests/test_patient_groups.py::test_metadata_csv_column_groups_and_carries_metadata"),
    Elsewhere(r"\.venv/bin/xray train --data DATA --set trainer\.cv_folds=5.*",
              "tests/test_cross_validation.py::test_the_final_model_is_the_k_fold_bag_and_serves_as_one + "
              "tests/test_cross_validation.py::test_retrain_fits_the_whole_pool_for_the_mean_best_epoch"),
    Elsewhere(r"\.venv/bin/xray runs show RUN( --json)?", "tests/test_pipeline.py::test_runs_list_show_and_verify"),
    Elsewhere(r"\.venv/bin/xray runs verify RUN( --public-key \S+ --artifacts \S+)?",
              "tests/test_pipeline.py::test_runs_list_show_and_verify + "
              "tests/test_seal.py::test_verify_with_exported_public_key"),
    Elsewhere(r"\.venv/bin/xray runs diff RUN_A RUN_B",
              "tests/test_tracking.py::test_runs_diff_names_the_changed_seed"),
    Elsewhere(r"\.venv/bin/xray runs export RUN_ID --mlflow \S+",
              "tests/test_tracking.py::test_exported_twice_to_sqlite_is_one_run_with_steps_artifacts_and_champion"),
    Elsewhere(r"\.venv/bin/xray models (promote \S+|rollback) --reason .+",
              "tests/test_tracking.py::test_promote_and_rollback_change_what_a_fresh_bento_serves"),
    Elsewhere(r"\.venv/bin/mlflow ui --backend-store-uri \S+ .*",
              "tests/test_tracking.py::test_export_to_a_real_mlflow_server (the same store behind `mlflow server`)"),
    Elsewhere(r"\.venv/bin/bentoml serve xray\.serving\.service:XrayClassifier .*",
              "tests/test_service.py::test_health_endpoints"),
    Elsewhere(r"\.venv/bin/bentoml build",
              "tests/test_unit_codegraph.py::test_bento_packs_exactly_what_serving_imports (what bentofile.yaml "
              "packs) + by hand: the build itself"),
    Elsewhere(r"\.venv/bin/bentoml containerize \S+", NO_DOCKER),
    Elsewhere(r"\.venv/bin/bentoml models (export|import) .*", ROUND_TRIP),
    Elsewhere(r"(cp|mkdir -p) .*audit\.jsonl.*|mkdir -p \S+/xray", ROUND_TRIP),
    Elsewhere(r"curl -F image=@chest\.png http://127\.0\.0\.1:3000/predict", "tests/test_service.py::test_predict_png"),
    Elsewhere(r"curl -F image=@chest\.dcm http://127\.0\.0\.1:3000/predict",
              "tests/test_service.py::test_dicom_gets_the_same_prediction_as_the_png_it_was_made_from"),
    Elsewhere(r"curl -F image=@chest\.png -F class_name=covid http://127\.0\.0\.1:3000/explain -o \S+",
              "tests/test_service.py::test_explain_returns_a_png_overlay"),
    Elsewhere(r"curl http://127\.0\.0\.1:3000/metadata",
              "tests/test_service.py::test_metadata_describes_the_served_model"),
    Elsewhere(r"\.venv/bin/uvicorn app:app --host 127\.0\.0\.1 --port 8000",
              "tests/test_app.py::test_train_end_to_end + "
              "tests/test_hardening.py::test_data_outside_the_roots_is_refused_alike_whether_or_not_it_exists"),
    Elsewhere(r"curl .* http://127\.0\.0\.1:8000/(train|runs/RUN_ID)", "tests/test_app.py::test_train_end_to_end"),
    Elsewhere(r"docker (build|run) .*", NO_DOCKER),
    Elsewhere(r"\.venv/bin/python -m torch\.distributed\.run .* -m xray train .*",
              "tests/test_distributed.py::test_two_ranks_make_one_run_like_a_single_process"),
    Elsewhere(r"(sbatch|bash) scripts/slurm_train\.sh .*", "tests/test_slurm_script.py::test_rendered_command"),
    Elsewhere(r"\.venv/bin/python scripts/measure_input_checks\.py",
              "by hand: its output is the table in docs/input-gate.md (the checks: tests/test_input_gate.py)"),
    Elsewhere(r"\.venv/bin/python scripts/holdout_split\.py .*",
              "tests/test_manifest.py::test_holdout_split_is_patient_disjoint_and_stratified"),
    Elsewhere(r"\.venv/bin/xray train --data config/multi-source\.example\.yaml .*",
              "tests/test_manifest.py::test_train_on_a_manifest_reports_metrics_per_source + by hand: the worked example"),
    Elsewhere(r"\.venv/bin/xray train --data \.\./shared/datasets/covid19-3class/train --set '?evaluation\.external=.*",
              "tests/test_external_checks.py + by hand: the closing note's run"),
    Elsewhere(r"\.venv/bin/python scripts/s3_server\.py (start|stop)",
              "tests/test_s3_source.py::test_s3_server_script_outlives_itself"),
    Elsewhere(r"(flock \S+ )?\.venv/bin/python scripts/(bench_\w+|soak)\.py.*",
              "by hand: benchmarks, on a quiet machine; results in docs/benchmarks.md (options checked here)"),
)

# xray subcommands that are quick, offline and write only into the current folder (or the private
# key, cache and store this test points them at): run exactly as the docs show them.
RUN_HERE = re.compile(
    r"(\S+ )?--help|--version|runs list|keys export( --out \S+)?|models (list|audit)( --json)?"
    r"|data demo [\w./-]+( --per-class \d+)?"
)
XRAY = (".venv/bin/xray", "xray")
# Programs a command may start with; a `.venv/bin/X` must be installed next to this interpreter.
PROGRAMS = {"make", "curl", "export", "cp", "mkdir", "docker", "sbatch", "bash", "flock"}


def bash_blocks(path: Path) -> list[tuple[int, str]]:
    """(first line number, text) of each fenced ```bash block."""
    text = path.read_text()
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1))
            for m in re.finditer(r"^```bash\n(.*?)^```", text, flags=re.M | re.S)]


def split_words(line: str) -> list[list[str]]:
    """The simple commands of one shell line: words split like the shell does, comments dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands: list[list[str]] = [[]]
    for word in lexer:
        if word in SEPARATORS:
            commands.append([])
        else:
            commands[-1].append(word)
    return [c for c in commands if c]


def doc_commands(path: Path) -> list[DocCommand]:
    found = []
    for first, block in bash_blocks(path):
        for number, line in _join_continuations(block, first):
            for words in split_words(line):
                env = []
                while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
                    name, _, value = words.pop(0).partition("=")
                    env.append((name, value))
                if words:
                    found.append(DocCommand(f"{path.relative_to(REPO)}:{number}", tuple(env), tuple(words)))
    return found


def _join_continuations(block: str, first: int) -> list[tuple[int, str]]:
    """Logical lines (a trailing backslash continues the line) with the number of their first line."""
    lines, current, start = [], "", None
    for offset, raw in enumerate(block.splitlines()):
        start = first + offset if start is None else start
        if raw.endswith("\\"):
            current += raw[:-1] + " "
            continue
        lines.append((start, current + raw))
        current, start = "", None
    return lines


ALL_COMMANDS = [c for path in DOCS for c in doc_commands(path)]


def xray_args(command: DocCommand) -> list[str] | None:
    """The arguments the xray CLI gets from this command (also under torchrun's ``-m xray``), else None."""
    argv = list(command.argv)
    if argv and argv[0] in XRAY:
        return argv[1:]
    if argv[:1] == [".venv/bin/python"] and "-m" in argv[2:] and argv[argv.index("-m", 2) + 1] == "xray":
        return argv[argv.index("-m", 2) + 2:]
    return None


def runs_here(command: DocCommand) -> bool:
    return command.argv[0] in XRAY and RUN_HERE.fullmatch(" ".join(command.argv[1:])) is not None


def covering(command: DocCommand) -> list[Elsewhere]:
    return [e for e in COVERED_ELSEWHERE if re.fullmatch(e.pattern, command.line)]


def test_the_docs_have_commands_to_check() -> None:
    assert len(ALL_COMMANDS) > 40, [c.where for c in ALL_COMMANDS]
    assert sum(runs_here(c) for c in ALL_COMMANDS) >= 5


def test_every_command_is_run_here_or_covered_elsewhere() -> None:
    unknown = [f"{c.where}: {c.line}" for c in ALL_COMMANDS
               if c.argv and c.argv[0] != "export" and not runs_here(c) and not covering(c)]
    assert not unknown, "commands in the docs nothing runs; run them here or name their test:\n" + "\n".join(unknown)
    both = [f"{c.where}: {c.line}" for c in ALL_COMMANDS if runs_here(c) and covering(c)]
    assert not both, both
    unused = [e.pattern for e in COVERED_ELSEWHERE if not any(re.fullmatch(e.pattern, c.line) for c in ALL_COMMANDS)]
    assert not unused, f"COVERED_ELSEWHERE entries no command in the docs matches any more: {unused}"


def test_every_covering_test_exists() -> None:
    for entry in COVERED_ELSEWHERE:
        for part in entry.covered_by.split(" + "):
            if part.startswith("by hand:"):
                continue
            target = part.split(" ", 1)[0]
            file, _, name = target.partition("::")
            assert (REPO / file).is_file(), f"{entry.pattern}: no file {file}"
            if name:
                assert re.search(rf"^def {re.escape(name)}\(", (REPO / file).read_text(), flags=re.M), \
                    f"{entry.pattern}: {file} has no test {name}"


def test_export_lines_only_set_variables() -> None:
    for c in ALL_COMMANDS:
        if c.argv[:1] == ("export",):
            assert all(re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", w) for w in c.argv[1:]), f"{c.where}: {c.line}"


def test_programs_exist() -> None:
    makefile = (REPO / "Makefile").read_text()
    for c in ALL_COMMANDS:
        program = c.argv[0]
        if program.startswith(".venv/bin/"):
            assert (VENV_BIN / program.removeprefix(".venv/bin/")).exists(), f"{c.where}: {program} is not installed"
        else:
            assert program in PROGRAMS, f"{c.where}: unexpected program {program!r}"
        if program == "make":
            for target in c.argv[1:]:
                assert re.search(rf"^{re.escape(target)}:", makefile, flags=re.M), f"{c.where}: no make target {target}"


@pytest.mark.parametrize("command", [c for c in ALL_COMMANDS if runs_here(c)], ids=lambda c: f"{c.where} {c.line}")
def test_safe_commands_run_as_written(command: DocCommand, tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key != "XRAY_SIGNING_KEY"}
    env.update({
        "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "XRAY_KEYS_DIR": str(tmp_path / "keys"), "XRAY_CACHE_DIR": str(tmp_path / "cache"),
        "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "true", **dict(command.env),
    })
    result = subprocess.run([sys.executable, "-m", "xray", *command.argv[1:]], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{command.where}: {command.line}\n{result.stderr[-2000:]}"
    assert result.stdout.strip(), f"{command.where}: {command.line} printed nothing"
    for word in command.argv[1:]:
        if "/" in word or word.endswith(".pub"):
            assert (tmp_path / word).exists(), f"{command.where}: {command.line} did not write {word}"


def parse_cli(args: list[str]) -> str:
    """Parse ``args`` with the real parser; '' when they parse (or ask for help), else argparse's complaint."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(args)
    except SystemExit as exc:
        return "" if exc.code == 0 else stderr.getvalue().strip().splitlines()[-1]
    return ""


def test_every_xray_command_in_a_bash_block_parses() -> None:
    for c in ALL_COMMANDS:
        args = xray_args(c)
        if args is not None:
            assert not parse_cli(args), f"{c.where}: {c.line}: {parse_cli(args)}"


def config_keys() -> set[str]:
    """Every dotted key and section of the config, from the dataclasses themselves."""

    def walk(cls: type, prefix: str) -> set[str]:
        keys = set()
        for field in dataclasses.fields(cls):
            name = f"{prefix}{field.name}"
            keys.add(name)
            kind = typing.get_type_hints(cls)[field.name]
            if dataclasses.is_dataclass(kind):
                keys |= walk(kind, f"{name}.")
        return keys

    return walk(PipelineConfig, "")


def set_pairs(words: list[str]) -> list[str]:
    """The ``key=value`` pairs that follow each ``--set`` (one or several, up to the next option)."""
    pairs, taking = [], False
    for word in words:
        if word == "--set":
            taking = True
        elif word.startswith("-"):
            taking = False
        elif taking:
            pairs.append(word)
    return pairs


def test_every_override_in_a_bash_block_is_a_valid_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each command's ``--set`` pairs name real keys, and load with the real config file as the command would."""
    monkeypatch.chdir(REPO)  # relative paths (../shared, config/) as the docs run them, from the repository root
    keys, checked = config_keys(), 0
    for c in ALL_COMMANDS:
        args = xray_args(c)
        if not args or args[0] != "train":
            continue
        pairs = set_pairs(args)
        for pair in pairs:
            assert "=" in pair and pair.partition("=")[0] in keys, f"{c.where}: --set {pair}: no such config key"
        if "../shared" in c.line and not SHARED.exists():
            continue  # the external check's folder must exist to load; the keys are checked above
        try:
            load_config(REPO / "config" / "pipeline.yaml", pairs)
        except ConfigError as exc:
            pytest.fail(f"{c.where}: {c.line}: {exc}")
        checked += 1
    assert checked >= 10


def code_spans(path: Path) -> list[str]:
    """Inline code spans and the bodies of fenced blocks (any language) of one Markdown file."""
    text = path.read_text()
    blocks = re.findall(r"^```\w*\n(.*?)^```", text, flags=re.M | re.S)
    prose = re.sub(r"^```\w*\n.*?^```", "", text, flags=re.M | re.S)
    return blocks + re.findall(r"`([^`\n]+)`", prose)


SPANS = [(path.relative_to(REPO), span) for path in DOCS for span in code_spans(path)]
SECTIONS = ("ingestion", "transformation", "trainer", "evaluation", "gate", "push")


def test_every_config_key_in_a_code_span_exists() -> None:
    keys, seen = config_keys(), 0
    pattern = rf"(?<![\w./-])((?:{'|'.join(SECTIONS)})\.[a-z_][a-z0-9_.]*)"
    for where, span in SPANS:
        for key in re.findall(pattern, span):
            key = key.rstrip(".")
            assert key in keys, f"{where}: `{span}` names {key!r}, which is not a config key"
            seen += 1
    assert seen > 50


def cli_tree() -> dict[str, set[str]]:
    """Top-level xray subcommands -> their subcommands (empty where there are none)."""
    import argparse

    def children(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        return dict(actions[0].choices) if actions else {}

    return {name: set(children(sub)) for name, sub in children(build_parser()).items()}


def test_every_xray_subcommand_named_in_the_docs_exists() -> None:
    tree, seen = cli_tree(), 0
    for where, span in SPANS:
        for match in re.finditer(r"(?:^|(?<=[\s/(]))xray ([a-z][a-z-]*)(?: ([a-z][a-z-]*))?", span):
            command, sub = match.groups()
            assert command in tree, f"{where}: `{span}`: xray has no subcommand {command!r}"
            if tree[command]:
                assert sub in tree[command], f"{where}: `{span}`: xray {command} has no subcommand {sub!r}"
            seen += 1
    assert seen > 30


PATH = re.compile(r"(?<![\w./-])((?:xray|scripts|tests|config|docs)/[\w./*{},-]*\w)")


def test_every_repository_path_in_the_docs_exists() -> None:
    for where, span in SPANS:
        for path in PATH.findall(span):
            if "{" in path:  # {train,val,test}_x.npy: files of a run, not of the repository
                continue
            assert list(REPO.glob(path)), f"{where}: `{span}`: {path} does not exist"
    for c in ALL_COMMANDS:
        for word in c.argv:
            if PATH.fullmatch(word):
                assert list(REPO.glob(word)), f"{c.where}: {c.line}: {word} does not exist"


def test_every_python_target_in_the_docs_exists() -> None:
    """``xray.pkg.module:Attr`` and dotted ``xray.pkg.module.name`` resolve (MLflow tags like ``xray.run_id`` aside)."""
    import importlib

    tracking = "".join(p.read_text() for p in (REPO / "xray" / "tracking").glob("*.py"))
    for where, span in SPANS:
        for target in re.findall(r"(?<![\w/.-])(xray(?:\.\w+)+(?::\w+)?)", span):
            if f'"{target}"' in tracking:  # a tag the MLflow export writes, not a module
                continue
            module, _, attr = target.partition(":")
            parts = module.split(".")
            for cut in range(len(parts), 0, -1):
                try:
                    found = importlib.import_module(".".join(parts[:cut]))
                    break
                except ModuleNotFoundError:
                    continue
            for name in [*parts[cut:], *([attr] if attr else [])]:
                assert hasattr(found, name), f"{where}: `{span}`: {target} does not resolve ({name})"
                found = getattr(found, name)
    app = ast.parse((REPO / "app.py").read_text())
    assert any(isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "app" for t in n.targets) for n in app.body)


def test_every_script_option_shown_exists() -> None:
    """A script's action (``start``) and every ``--option`` given to it in a bash block appear in its own --help."""
    for c in ALL_COMMANDS:
        scripts = [w for w in c.argv if w.startswith("scripts/") and w.endswith(".py")]
        if not scripts:
            continue
        shown = list(c.argv[c.argv.index(scripts[0]) + 1:])
        words = [w for w in shown if w.startswith("--")] + shown[:1] * (bool(shown) and not shown[0].startswith("-"))
        usage = subprocess.run([sys.executable, str(REPO / scripts[0]), "--help"], capture_output=True, text=True,
                               timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
        assert usage.returncode == 0, f"{c.where}: {scripts[0]} --help: {usage.stderr[-1000:]}"
        for word in words:
            assert word in usage.stdout, f"{c.where}: {c.line}: {scripts[0]} does not take {word}"


def test_every_doc_is_listed_in_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    read_on = readme[readme.index("## Read on"):]
    listed = set(re.findall(r"\]\((docs/[\w.-]+\.md)\)", read_on))
    present = {str(p.relative_to(REPO)) for p in DOCS[1:]}
    assert present - listed == set(), f"add a row to the README's 'Read on' table for: {sorted(present - listed)}"
    assert listed - present == set(), f"the README lists docs that do not exist: {sorted(listed - present)}"
    for path in DOCS:
        for link in re.findall(r"\]\(([\w./-]+\.md)\)", path.read_text()):
            assert (path.parent / link).is_file(), f"{path.relative_to(REPO)}: broken link {link}"


def test_every_python_block_compiles() -> None:
    for path in DOCS:
        for block in re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.M | re.S):
            compile(block, str(path), "exec")


def test_the_readme_stays_a_front_door() -> None:
    assert len((REPO / "README.md").read_text().splitlines()) <= 220
