"""Pipeline configuration: one frozen dataclass per stage, loaded strictly from YAML.

Strict loading (unknown keys and wrong types are errors) matters because a
typo such as ``trainer.epoch`` would otherwise silently train with defaults
and the run would record a config nobody asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Names and limits the pipeline, the app and serving share, defined once here (a module free of heavy imports).
CANDIDATES = ("simple_cnn", "densenet121", "densenet169", "densenet201")  # what trainer.candidates may name
DEFAULT_MODEL_NAME = "xray-classifier"  # the BentoML model the pusher writes and serving loads
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # one uploaded image, at /predict of the Bento and of the app


@dataclass(frozen=True)
class S3Config:
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    max_concurrency: int = 8
    max_attempts: int = 5


@dataclass(frozen=True)
class IngestionConfig:
    min_images_per_class: int = 10
    leakage: str = "warn"  # warn | fail: exact duplicates or patients across source splits
    group_by: str = ""  # patient grouping: a metadata_csv column, or a regex with a named group "patient" on the path
    metadata_csv: str = ""  # CSV with a "path" column (relative path or file name) + any columns (patient, sex, view…)
    class_names: tuple[str, ...] = ()  # names for integer labels (.npz); folders name their classes
    demo_images_per_class: int = 100
    quality: str = "report"  # report | exclude: films that fail an input_gate image check (listed either way)
    s3: S3Config = field(default_factory=S3Config)


@dataclass(frozen=True)
class AugmentConfig:
    hflip: bool = True
    rotation_degrees: float = 10.0
    translate: float = 0.06
    scale: float = 0.10
    brightness: float = 0.10
    contrast: float = 0.10
    gamma: float = 0.0  # log-uniform gamma in [1/(1+g), 1+g]: another scanner's tone curve
    blur: float = 0.0  # Gaussian blur, sigma up to this many pixels, on half the images: softer detectors
    noise: float = 0.0  # Gaussian noise, std up to this (on the 0..1 scale): noisier exposures


INTENSITIES = ("none", "equalize")  # transformation.intensity: what xray.data.preprocessing.Preprocessing applies


@dataclass(frozen=True)
class TransformationConfig:
    image_size: int | str = "auto"  # pixels, or "auto": from the dataset's native resolution
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 42
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    intensity: str = "none"  # none | equalize: each film's grey histogram equalised, in training and serving alike


@dataclass(frozen=True)
class TrainerConfig:
    candidates: tuple[str, ...] = ("simple_cnn", "densenet121")
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    scheduler: str = "cosine"  # cosine | plateau
    warmup_epochs: int = 1
    label_smoothing: float = 0.0
    precise_bn_images: int = 1024  # recompute BatchNorm statistics on this many clean train images per epoch
    ema_epochs: float = 0.0  # > 0: validate and keep a moving average of the weights over about this many epochs
    early_stopping_patience: int = 10
    min_steps: int = 400  # small datasets: stretch epochs (and warmup, patience) to at least this many optimizer steps
    min_steps_per_epoch: int = 8  # > 0: small datasets halve the batch (not below 16) until an epoch has this many steps
    monitor: str = "auto"  # validation metric for early stopping and the best checkpoint; auto: loss on a small validation set
    class_weighting: str = "sqrt"  # sqrt | balanced | none: inverse-frequency loss weights
    balance_by: str = "class"  # class | class_source: the cells those weights count (source matters when pooled)
    weights: str = "none"  # none | imagenet | path to a torchvision state_dict
    precision: str = "auto"  # auto | bf16 | fp32
    channels_last: bool = True
    num_threads: int = 0  # 0: all cores
    time_budget: str | float = "15m"  # 90s | 10m | 1h | none (0): the whole training stage fits in it
    budget_per_image: float = 0.8  # > 0: the budget is at most this many seconds per training image (small data, short run)
    replay_plan: str = ""  # an earlier run's directory (or its model_trainer/artifact.json): train its recorded plan again
    max_batches_per_epoch: int = 0  # 0: no limit (smoke runs and benchmarks)
    seed: int = 0
    cv_folds: int = 0  # >= 2: stratified k-fold on train+val for the candidate choice
    cv_final_model: str = "ensemble"  # ensemble (the K fold models averaged) | retrain | best_fold


@dataclass(frozen=True)
class OperatingPointConfig:
    positive: tuple[str, ...] = ()  # classes whose summed probability is "disease"; empty: no operating point
    target_sensitivity: float = 0.95  # the threshold is the highest that reaches this sensitivity on validation


@dataclass(frozen=True)
class ExternalSource:
    """One external check: a folder of CLASS/ subfolders from another source, and which model class each folder is.

    ``classes`` maps a folder under ``uri`` to a model class; a source may cover only some classes.
    Empty: every folder named like a model class is that class.
    """

    uri: str
    classes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class EvaluationConfig:
    selection_metric: str = "roc_auc"  # chosen on validation; test stays an honest estimate
    gradcam_per_class: int = 3
    calibration_bins: int = 15
    operating_point: OperatingPointConfig = field(default_factory=OperatingPointConfig)
    bootstrap_resamples: int = 1000  # test-set 95 % intervals, and validation's "cannot tell apart" (ensemble)
    bootstrap_seed: int = 0
    subgroup_min_count: int = 30  # subgroups smaller than this are reported and flagged as small
    ensemble: str = "auto"  # auto: averaged candidates win when validation cannot tell the best two apart | always | off
    bootstrap_level: float = 0.95  # the interval's coverage
    tta: str = "auto"  # test-time hflip averaging: auto (kept per model where it helps validation) | on | off
    external: tuple[ExternalSource, ...] = ()  # other sources' films, scored like /predict (docs/external-checks.md)
    shortcut_warn: float = 0.5  # a shortcut probe scoring this much above chance (0 chance, 1 perfect) is warned about
    calibration: str = "temperature"  # temperature scaling fitted on validation, served | none
    ood: str = "mahalanobis"  # the model's own OOD score (penultimate features), shipped and served | none
    ood_acceptance: float = 0.99  # share of validation films the OOD threshold accepts
    ood_confidence: float = 0.95  # the threshold is an upper bound, at this confidence, on that quantile; 0: the point estimate
    ood_suite: bool = True  # score the OOD suite (non-radiographs, inverted and rotated films) through /predict's path


@dataclass(frozen=True)
class GateConfig:
    min_roc_auc: float = 0.80
    min_accuracy: float = 0.0
    min_class_recall: float = 0.0
    compare_with_production: bool = True
    min_ood_refusal: float = 0.0  # share of the OOD suite that must be refused; 0: off
    min_external_recall: float | dict[str, float] = 0.5  # per (source, class) recall on the external checks; a map: per class
    max_shortcut_score: float = 1.0  # refuse a model whose shortcut score is above this (1.0: off)


@dataclass(frozen=True)
class PushConfig:
    enabled: bool = True
    model_name: str = DEFAULT_MODEL_NAME
    s3_uri: str | None = None
    export: str = "onnx"  # onnx: export the model at push, checked against eager PyTorch, for CPU runtimes | none
    int8: bool = True  # also quantize the export to int8 (static, calibrated on training films), under the same check


@dataclass(frozen=True)
class InputGateConfig:
    """Checks on what comes in, before any model sees it: each mode is refuse | warn | off."""

    dicom_modality: str = "refuse"  # Modality not a projection radiograph (CR, DX, DR)
    dicom_body_part: str = "refuse"  # BodyPartExamined present and not CHEST
    dicom_view: str = "refuse"  # ViewPosition present and neither PA, AP nor lateral (oblique, decubitus…)
    lateral: str = "refuse"  # refuse | warn: ViewPosition LL, RL or LATERAL
    dicom_photometric: str = "refuse"  # PhotometricInterpretation other than MONOCHROME1/2 (RGB, YBR, PALETTE)
    too_small: str = "refuse"
    nearly_constant: str = "refuse"
    posterized: str = "refuse"
    colour: str = "refuse"
    inverted: str = "refuse"
    rotated: str = "refuse"
    upside_down: str = "refuse"
    min_side: int = 0  # pixels; 0: the model's own input (its source size, else its image size)
    min_std: float = 5.0  # grey standard deviation (0..255) below which a film is nearly constant
    min_grey_levels: int = 32  # fewer distinct grey levels: posterized
    max_top_levels_share: float = 0.9  # or this share of the pixels in 16 grey levels: posterized
    colour_spread: int = 24  # a pixel is coloured when its channels differ by more than this (0..255)
    max_colour_share: float = 0.02  # more coloured pixels than this share: colour
    inverted_margin: float = 0.3  # polarity score below minus this: inverted
    rotated_margin: float = 0.3  # orientation score below minus this: rotated by 90 or 270 degrees
    upside_down_margin: float = 0.4  # uprightness score below minus this: upside down (set on the training sources)


@dataclass(frozen=True)
class PipelineConfig:
    data_uri: str = "demo"
    artifacts_dir: str = "artifacts"
    ingestion: IngestionConfig = field(default_factory=IngestionConfig)
    transformation: TransformationConfig = field(default_factory=TransformationConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    push: PushConfig = field(default_factory=PushConfig)
    input_gate: InputGateConfig = field(default_factory=InputGateConfig)
