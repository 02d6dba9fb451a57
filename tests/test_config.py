"""Config loading is strict: typos and wrong types are errors, never silent defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from xray.config import _CHOICES, _RANGES, flatten, apply_override, config_to_dict, load_config
from xray.errors import ConfigError

from .conftest import REPO, run_cli


def test_default_config_file_loads_and_matches_dataclass_defaults() -> None:
    """`xray train` outside the repo (no config/pipeline.yaml there) must train with the same defaults."""
    config = load_config(REPO / "config" / "pipeline.yaml")
    assert config == load_config(None)
    assert config.trainer.time_budget == "15m" and config.trainer.min_steps == 400
    assert config.trainer.candidates == ("simple_cnn", "densenet121")
    assert config.transformation.augment.hflip is True
    assert config.evaluation.selection_metric == "roc_auc"


def test_overrides_parse_yaml_values() -> None:
    config = load_config(None, ["trainer.epochs=3", "trainer.candidates=[densenet169, simple_cnn]", "push.s3_uri=s3://b/p"])
    assert config.trainer.epochs == 3
    assert config.trainer.candidates == ("densenet169", "simple_cnn")
    assert config.push.s3_uri == "s3://b/p"


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.epoch=3", "unknown key trainer.epoch"),
        ("trainer.epochs=three", "trainer.epochs: expected an integer"),
        ("trainer.candidates=[resnet50]", "unknown candidate 'resnet50'"),
        ("trainer.precision=fp8", "trainer.precision must be one of"),
        ("nosuchsection.key=1", "unknown key nosuchsection"),
        ("trainer.epochs=0", "trainer.epochs must be between 1 and 10000, got 0"),
        ("transformation.augment.hflip=maybe", "expected true or false"),
        ("trainer.cv_folds=1", "cv_folds"),
        ("trainer.min_steps=-1", "trainer.min_steps must be between 0 and"),
        ("trainer.min_steps_per_epoch=-1", "trainer.min_steps_per_epoch must be between 0 and"),
        ("trainer.min_steps_per_epoch=10001", "trainer.min_steps_per_epoch must be between 0 and 10000"),
        ("trainer.min_steps_per_epoch=1e9", "trainer.min_steps_per_epoch: expected an integer"),
        ("trainer.monitor=auc", "trainer.monitor must be one of"),
        ("trainer.cv_final_model=bag", "trainer.cv_final_model must be one of"),
        ("trainer.balance_by=source", "trainer.balance_by must be one of class, class_source"),
        ("trainer.ema_epochs=-0.5", "trainer.ema_epochs must be between 0 and"),
        ("ingestion.group_by=person(\\d+)_", "named group 'patient'"),
        ("ingestion.group_by=[unclosed", "named group 'patient'"),
        ("evaluation.operating_point.target_sensitivity=1.5", "target_sensitivity must be in (0, 1]"),
        ("evaluation.operating_point.target_sensitivity=0", "target_sensitivity must be in (0, 1]"),
        ("evaluation.operating_point.positive=[a, a]", "lists a class twice"),
        ("evaluation.bootstrap_resamples=10", "bootstrap_resamples must be between 1000 and"),
        ("evaluation.subgroup_min_count=0", "subgroup_min_count must be between 1 and"),
    ],
)
def test_bad_overrides_name_the_problem(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(None, [override])


@pytest.mark.parametrize("key", sorted(_CHOICES))
def test_every_choice_key_rejects_a_value_outside_its_list(key: str) -> None:
    """Each enumerated key fails at load with its allowed values named, and accepts each listed value."""
    with pytest.raises(ConfigError, match=f"{key} must be one of"):
        load_config(None, [f"{key}=not_a_choice"])
    for allowed in _CHOICES[key]:
        section, name = key.split(".")
        value = getattr(getattr(load_config(None, [f"{key}={allowed}"]), section), name)
        assert value == allowed


def test_override_without_equals_is_rejected() -> None:
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_override({}, "trainer.epochs")


def test_unknown_key_in_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  epochs: 2\n  learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match="unknown key trainer.learning_rat"):
        load_config(path)


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize(
    "override",
    [
        "trainer.epochs=1000000000",
        "trainer.learning_rate=.nan",
        "trainer.learning_rate=.inf",
        "trainer.learning_rate=-0.1",
        "trainer.num_threads=-5",
        "evaluation.calibration_bins=0",
        "trainer.batch_size=0",
        "trainer.weight_decay=-1",
        "trainer.label_smoothing=1.5",
        "trainer.seed=-1",
        "trainer.cv_folds=1000",
        "transformation.val_fraction=1.5",
        "transformation.test_fraction=.nan",
        "transformation.image_size=100000",
        "transformation.augment.rotation_degrees=720",
        "ingestion.s3.max_concurrency=0",
        "gate.min_roc_auc=1.5",
        "gate.min_accuracy=.nan",
        "evaluation.gradcam_per_class=-1",
    ],
)
def test_out_of_range_overrides_are_refused(override: str) -> None:
    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match=key.split(".")[-1]):
        load_config(None, [override])


def test_every_numeric_key_has_a_range() -> None:
    """A numeric key added without bounds would let any value through: this lists it."""
    flat = flatten(config_to_dict(load_config(REPO / "config" / "pipeline.yaml")))
    numeric = {k for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    checked_elsewhere = {  # open-interval bounds, checked in validate()
        "transformation.val_fraction", "transformation.test_fraction", "evaluation.operating_point.target_sensitivity",
        "gate.min_external_recall",  # a number or a per-class map, checked in validate()
    }
    assert numeric - set(_RANGES) - checked_elsewhere == set()
    for key, value in flat.items():
        if key in _RANGES:
            low, high = _RANGES[key]
            assert low <= value <= high, key  # the shipped defaults are inside their own bounds


def test_cli_refuses_an_out_of_range_override_in_one_line(tmp_path: Path) -> None:
    overrides = ["--set", "trainer.epochs=1000000000", "--set", f"artifacts_dir={tmp_path}"]
    result = run_cli("train", "--data", "demo", *overrides)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xray: error:") and "trainer.epochs" in lines[0], result.stderr
    assert not any(tmp_path.iterdir())  # no run was created


@pytest.mark.parametrize("data", ["~nosuchuser/data", "x" * 300, "/tmp/" + "y" * 300 + "/z"])
def test_cli_unusable_data_paths_are_one_line_errors(tmp_path: Path, data: str) -> None:
    result = run_cli("train", "--data", data, "--set", f"artifacts_dir={tmp_path}")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("xray: error:") and "Traceback" not in result.stderr, result.stderr[-2000:]
