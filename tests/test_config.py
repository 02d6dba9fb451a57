"""Config loading is strict: typos and wrong types are errors, never silent defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from xray.config import apply_override, load_config
from xray.errors import ConfigError

from .conftest import REPO


def test_default_config_file_loads_and_matches_dataclass_defaults() -> None:
    config = load_config(REPO / "config" / "pipeline.yaml")
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
        ("trainer.epochs=0", "trainer.epochs must be positive"),
        ("transformation.augment.hflip=maybe", "expected true or false"),
        ("trainer.cv_folds=1", "cv_folds"),
        ("trainer.min_steps=-1", "trainer.min_steps must not be negative"),
        ("ingestion.group_by=person(\\d+)_", "named group 'patient'"),
        ("ingestion.group_by=[unclosed", "named group 'patient'"),
        ("evaluation.operating_point.target_sensitivity=1.5", "target_sensitivity must be in (0, 1]"),
        ("evaluation.operating_point.target_sensitivity=0", "target_sensitivity must be in (0, 1]"),
        ("evaluation.operating_point.positive=[a, a]", "lists a class twice"),
        ("evaluation.bootstrap_resamples=10", "bootstrap_resamples must be between 1000"),
        ("evaluation.subgroup_min_count=0", "subgroup_min_count must be positive"),
        ("trainer.ema_epochs=-0.5", "trainer.ema_epochs must not be negative"),
    ],
)
def test_bad_overrides_name_the_problem(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(None, [override])


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
