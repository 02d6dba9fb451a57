"""Load the pipeline config: YAML file, then ``--set section.key=value`` overrides.

The resolved config is what a run records, so validation happens here, once,
before any work starts.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

import yaml

from xray.entity.config_entity import CANDIDATES, INTENSITIES, PipelineConfig
from xray.errors import ConfigError
from xray.data.grouping import patient_pattern
from xray.typed import SchemaError, from_mapping, to_jsonable

DEFAULT_CONFIG_PATH = Path("config/pipeline.yaml")
_CHOICES = {
    "ingestion.leakage": ("warn", "fail"),
    "trainer.scheduler": ("cosine", "plateau"),
    "trainer.precision": ("auto", "bf16", "fp32"),
    "trainer.class_weighting": ("sqrt", "balanced", "none"),
    "trainer.balance_by": ("class", "class_source"),
    "transformation.intensity": INTENSITIES,
    "trainer.monitor": ("auto", "roc_auc", "accuracy", "loss"),
    "trainer.cv_final_model": ("ensemble", "retrain", "best_fold"),
    "evaluation.selection_metric": ("roc_auc", "accuracy", "macro_f1"),
    "evaluation.ensemble": ("auto", "always", "off"),
    "evaluation.tta": ("auto", "on", "off"),
    "evaluation.calibration": ("temperature", "none"),
    "evaluation.ood": ("mahalanobis", "none"),
    "push.export": ("onnx", "none"),
    "ingestion.quality": ("report", "exclude"),
    "input_gate.lateral": ("refuse", "warn"),
    **{f"input_gate.{check}": ("refuse", "warn", "off") for check in (
        "dicom_modality", "dicom_body_part", "dicom_view", "dicom_photometric",
        "too_small", "nearly_constant", "posterized", "colour", "inverted", "rotated", "upside_down",
    )},
}
# Inclusive bounds for every numeric key: wide enough for any real run, narrow enough that
# a typo (or a hostile /train caller) cannot ask for a billion epochs, NaN or a negative rate.
_SEED_MAX = 2**32 - 1
_RANGES: dict[str, tuple[float, float]] = {
    "ingestion.min_images_per_class": (1, 1_000_000),
    "ingestion.demo_images_per_class": (1, 10_000),
    "ingestion.s3.max_concurrency": (1, 64),
    "ingestion.s3.max_attempts": (1, 20),
    "transformation.seed": (0, _SEED_MAX),
    "transformation.augment.rotation_degrees": (0, 180),
    "transformation.augment.translate": (0, 0.5),
    "transformation.augment.scale": (0, 0.9),
    "transformation.augment.brightness": (0, 1),
    "transformation.augment.contrast": (0, 1),
    "trainer.epochs": (1, 10_000),
    "trainer.batch_size": (1, 4096),
    "trainer.learning_rate": (1e-9, 10),
    "trainer.weight_decay": (0, 1),
    "trainer.warmup_epochs": (0, 10_000),
    "trainer.label_smoothing": (0, 0.99),
    "trainer.precise_bn_images": (0, 1_000_000),
    "trainer.ema_epochs": (0, 10_000),
    "trainer.early_stopping_patience": (0, 10_000),
    "trainer.min_steps": (0, 10_000_000),
    "trainer.min_steps_per_epoch": (0, 10_000),
    "trainer.budget_per_image": (0, 3600),
    "trainer.num_threads": (0, 1024),
    "trainer.max_batches_per_epoch": (0, 1_000_000_000),
    "trainer.seed": (0, _SEED_MAX),
    "trainer.cv_folds": (0, 100),
    "evaluation.gradcam_per_class": (0, 100),
    "evaluation.calibration_bins": (1, 1000),
    "evaluation.bootstrap_resamples": (1000, 100_000),  # fewer resamples give intervals too rough to report
    "evaluation.bootstrap_seed": (0, 2**32 - 1),
    "evaluation.subgroup_min_count": (1, 1_000_000),
    "evaluation.bootstrap_level": (0.5, 0.999),
    "transformation.augment.gamma": (0, 3),  # 0: off
    "transformation.augment.blur": (0, 5),
    "transformation.augment.noise": (0, 0.5),
    "gate.min_roc_auc": (0, 1),
    "gate.min_accuracy": (0, 1),
    "gate.min_class_recall": (0, 1),
    "gate.min_ood_refusal": (0, 1),
    "evaluation.ood_acceptance": (0.5, 1),
    "evaluation.ood_confidence": (0, 0.999),
    "input_gate.min_side": (0, 4096),
    "input_gate.min_std": (0, 128),
    "input_gate.min_grey_levels": (0, 256),
    "input_gate.max_top_levels_share": (0, 1),
    "input_gate.colour_spread": (0, 255),
    "input_gate.max_colour_share": (0, 1),
    "input_gate.inverted_margin": (0, 5),
    "input_gate.rotated_margin": (0, 5),
    "input_gate.upside_down_margin": (0, 5),
    "gate.max_shortcut_score": (0, 1),
    "evaluation.shortcut_warn": (0, 1),
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
    _migrate_external(raw)
    _unbool_choices(raw)
    try:
        config = from_mapping(PipelineConfig, raw)
    except SchemaError as exc:
        raise ConfigError(f"config: {exc}") from None
    validate(config)
    return config


def _unbool_choices(raw: dict[str, Any]) -> None:
    """Read YAML 1.1's booleans back as the words on/off where a choice key lists them.

    ``tta: off`` in a file and ``--set evaluation.tta=off`` both reach here as False, since
    PyYAML follows YAML 1.1; the user wrote the word, and the key's choices hold it.
    """
    for key, allowed in _CHOICES.items():
        section, name = key.split(".")
        block = raw.get(section)
        if isinstance(block, dict) and isinstance(block.get(name), bool):
            word = "on" if block[name] else "off"
            if word in allowed:
                block[name] = word


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
    flat = flatten(config_to_dict(config))
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
    check_ranges(flat)
    size = config.transformation.image_size
    if size != "auto" and (isinstance(size, str) or not 32 <= size <= 1024):
        raise ConfigError(f"config: transformation.image_size must be 'auto' or between 32 and 1024, got {size!r}")
    t = config.transformation
    if not (0 < t.val_fraction < 1 and 0 < t.test_fraction < 1 and t.val_fraction + t.test_fraction < 0.9):
        raise ConfigError("config: val_fraction and test_fraction must be in (0, 1) and sum below 0.9")
    parse_duration(trainer.time_budget, "trainer.time_budget")
    if trainer.replay_plan and not Path(trainer.replay_plan).exists():  # the rest is checked where it is read
        raise ConfigError(f"config: trainer.replay_plan {trainer.replay_plan!r} does not exist (a run directory, or its "
                          "model_trainer/artifact.json)")
    if trainer.cv_folds == 1 or trainer.cv_folds < 0:
        raise ConfigError("config: trainer.cv_folds must be 0 (off) or at least 2")
    _validate_clinical(config)
    _validate_evaluation(config)


def _validate_evaluation(config: PipelineConfig) -> None:
    """Each external source a local folder holding its mapped folders; the gate's thresholds inside 0..1.

    Class names are checked once the data are known (``xray.evaluation.external.check_class_maps``).
    """
    for index, source in enumerate(config.evaluation.external):
        key = f"evaluation.external[{index}]"
        if not source.uri.strip():
            raise ConfigError(f"config: {key}.uri is empty (a folder of CLASS/ subfolders from another source)")
        if source.uri.startswith("s3://") or not Path(source.uri).is_dir():
            raise ConfigError(f"config: {key}.uri must be a local folder of CLASS/ subfolders, got {source.uri!r}")
        for folder, name in source.classes.items():
            if not name.strip():
                raise ConfigError(f"config: {key}.classes.{folder} names no model class")
            if not (Path(source.uri) / folder).is_dir():
                raise ConfigError(f"config: {key}.classes.{folder}: no folder {folder!r} in {source.uri}")
    recall = config.gate.min_external_recall
    for name, value in (recall.items() if isinstance(recall, dict) else [("", recall)]):
        key = f"gate.min_external_recall{'.' + name if name else ''}"
        if not (math.isfinite(value) and 0 <= value <= 1):
            raise ConfigError(f"config: {key} must be between 0 and 1, got {value!r}")


def _migrate_external(raw: dict[str, Any]) -> None:
    """The one-folder form (``evaluation.external: DIR`` + ``external_classes``) gets a one-line pointer to the list form."""
    evaluation = raw.get("evaluation")
    if isinstance(evaluation, dict) and (isinstance(evaluation.get("external"), str) or "external_classes" in evaluation):
        raise ConfigError(
            "config: evaluation.external is a list of sources, each {uri: DIR, classes: {FOLDER: MODEL_CLASS}}, "
            "e.g. --set 'evaluation.external=[{uri: DIR, classes: {Normal: normal}}]' (evaluation.external_classes is gone)"
        )


def _validate_clinical(config: PipelineConfig) -> None:
    """Patient grouping, operating point, bootstrap: class names are checked later, once the data are known."""
    ingestion, evaluation = config.ingestion, config.evaluation
    if ingestion.group_by and not ingestion.metadata_csv and patient_pattern(ingestion.group_by) is None:
        raise ConfigError(
            f"config: ingestion.group_by {ingestion.group_by!r} must be a regex with a named group 'patient' "
            "(e.g. 'person(?P<patient>\\d+)_'), or a column of ingestion.metadata_csv"
        )
    point = evaluation.operating_point
    if not 0 < point.target_sensitivity <= 1:
        raise ConfigError(f"config: evaluation.operating_point.target_sensitivity must be in (0, 1], got {point.target_sensitivity}")
    if len(set(point.positive)) != len(point.positive):
        raise ConfigError("config: evaluation.operating_point.positive lists a class twice")


def check_ranges(flat: dict[str, Any]) -> None:
    """Every numeric key finite and inside ``_RANGES``: one line naming the key, the bounds and the value."""
    for key, (low, high) in _RANGES.items():
        if key not in flat:
            continue
        value = flat[key]
        if not (isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high):
            raise ConfigError(f"config: {key} must be between {low:g} and {high:g}, got {value!r}")


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
MAX_DURATION_S = 7 * 24 * 3600.0


def parse_duration(value: str | float, key: str = "duration") -> float | None:
    """``90s``, ``10m``, ``1.5h`` or a number of seconds -> seconds; ``none`` or 0 -> None (no limit)."""
    text = str(value).strip().lower()
    if text in ("none", "0", "0.0", "off"):
        return None
    number, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS else (text, "s")
    try:
        seconds = float(number) * _UNITS[unit]
    except ValueError:
        raise ConfigError(f"config: {key} must look like 90s, 10m, 1h or none, got {value!r}") from None
    if not 0 < seconds <= MAX_DURATION_S:
        raise ConfigError(f"config: {key} must be between 1s and 7 days (or none), got {value!r}")
    return seconds


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
