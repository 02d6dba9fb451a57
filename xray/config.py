"""Load the pipeline config: YAML file, then ``--set section.key=value`` overrides.

The resolved config is what a run records, so validation happens here, once,
before any work starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import yaml

from xray.entity.config_entity import CANDIDATES, PipelineConfig
from xray.errors import ConfigError
from xray.typed import SchemaError, from_mapping, to_jsonable

DEFAULT_CONFIG_PATH = Path("config/pipeline.yaml")
_CHOICES = {
    "ingestion.leakage": ("warn", "fail"),
    "trainer.scheduler": ("cosine", "plateau"),
    "trainer.precision": ("auto", "bf16", "fp32"),
    "trainer.class_weighting": ("sqrt", "balanced", "none"),
    "trainer.monitor": ("roc_auc", "accuracy", "loss"),
    "trainer.cv_final_model": ("retrain", "best_fold"),
    "evaluation.selection_metric": ("roc_auc", "accuracy", "macro_f1"),
    "evaluation.ensemble": ("auto", "always", "off"),
    "evaluation.tta": ("auto", "on", "off"),
}


def load_config(
    path: Path | str | None = None,
    overrides: Iterable[str] = (),
    data_uri: str | None = None,
) -> PipelineConfig:
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    for item in overrides:
        apply_override(raw, item)
    if data_uri is not None:
        raw["data_uri"] = data_uri
    return config_from_mapping(raw)


def config_from_mapping(raw: dict[str, Any]) -> PipelineConfig:
    try:
        config = from_mapping(PipelineConfig, raw)
    except SchemaError as exc:
        raise ConfigError(f"config: {exc}") from None
    validate(config)
    return config


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply ``a.b.c=value`` to nested ``raw``; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    dotted, _, text = item.partition("=")
    keys = [k for k in dotted.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"override {item!r} names no key")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def config_to_dict(config: PipelineConfig) -> dict[str, Any]:
    return to_jsonable(config)


def validate(config: PipelineConfig) -> None:
    flat = _flatten(config_to_dict(config))
    for key, allowed in _CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"config: {key} must be one of {', '.join(allowed)}, got {flat[key]!r}")
    trainer = config.trainer
    if not trainer.candidates:
        raise ConfigError("config: trainer.candidates is empty")
    for name in trainer.candidates:
        if name not in CANDIDATES:
            raise ConfigError(f"config: unknown candidate {name!r} (known: {', '.join(CANDIDATES)})")
    if len(set(trainer.candidates)) != len(trainer.candidates):
        raise ConfigError("config: trainer.candidates lists a model twice")
    positive = {
        "trainer.epochs": trainer.epochs,
        "trainer.batch_size": trainer.batch_size,
        "ingestion.min_images_per_class": config.ingestion.min_images_per_class,
        "trainer.learning_rate": trainer.learning_rate,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config: {key} must be positive, got {value}")
    for key, value in {"trainer.min_steps": trainer.min_steps, "trainer.ema_epochs": trainer.ema_epochs}.items():
        if value < 0:
            raise ConfigError(f"config: {key} must not be negative (0 turns it off), got {value}")
    size = config.transformation.image_size
    if size != "auto" and (isinstance(size, str) or not 32 <= size <= 1024):
        raise ConfigError(f"config: transformation.image_size must be 'auto' or between 32 and 1024, got {size!r}")
    t = config.transformation
    if not (0 < t.val_fraction < 1 and 0 < t.test_fraction < 1 and t.val_fraction + t.test_fraction < 0.9):
        raise ConfigError("config: val_fraction and test_fraction must be in (0, 1) and sum below 0.9")
    if trainer.cv_folds == 1 or trainer.cv_folds < 0:
        raise ConfigError("config: trainer.cv_folds must be 0 (off) or at least 2")
    _validate_evaluation(config)
    augment = config.transformation.augment
    for key, value, top in (("gamma", augment.gamma, 3.0), ("blur", augment.blur, 5.0), ("noise", augment.noise, 0.5)):
        if not 0 <= value <= top:
            raise ConfigError(f"config: transformation.augment.{key} must be between 0 (off) and {top}, got {value}")


def _validate_evaluation(config: PipelineConfig) -> None:
    ev = config.evaluation
    if ev.bootstrap_resamples < 100:
        raise ConfigError(f"config: evaluation.bootstrap_resamples must be at least 100, got {ev.bootstrap_resamples}")
    if not 0.5 <= ev.bootstrap_level < 1:
        raise ConfigError(f"config: evaluation.bootstrap_level must be in [0.5, 1), got {ev.bootstrap_level}")
    if ev.external is None:
        if ev.external_classes:
            raise ConfigError("config: evaluation.external_classes is set but evaluation.external is not")
        return
    if ev.external.startswith("s3://") or not Path(ev.external).is_dir():
        raise ConfigError(f"config: evaluation.external must be a local folder of CLASS/ subfolders, got {ev.external!r}")
    if len(ev.external_classes) < 2:
        raise ConfigError(
            "config: evaluation.external needs evaluation.external_classes mapping each model class to a subfolder, "
            'e.g. {normal: Normal, pneumonia: "Viral Pneumonia"}'
        )


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
