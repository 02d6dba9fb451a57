"""The artifacts each stage emits: a fixed schema, saved as JSON beside its files.

Every artifact carries who made it, from what (``parents``: lineage by id),
the fingerprint that makes it reusable, and a sha256 for each file it names,
so an auditor can check a run without trusting the code that wrote it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class FileRecord:
    path: str  # relative to the run directory
    sha256: str
    size: int


@dataclass(frozen=True)
class ArtifactHeader:
    artifact_type: str
    artifact_id: str
    producer: str  # the stage that made it
    run_id: str  # the run that computed it (differs from the reader's run when reused from cache)
    created_at: str
    fingerprint: str
    parents: tuple[str, ...] = ()
    files: tuple[FileRecord, ...] = ()


@dataclass(frozen=True)
class UnreadableFile:
    """A file the source holds that could not be decoded: excluded from the data, never silently."""

    path: str
    reason: str


@dataclass(frozen=True)
class DuplicateGroup:
    sha256: str
    items: tuple[str, ...]  # "split/relative-path" of each copy
    splits: tuple[str, ...]
    labels: tuple[str, ...]


@dataclass(frozen=True)
class GroupLeak:
    """A patient with films in more than one source split."""

    group: str
    splits: tuple[str, ...]


@dataclass(frozen=True)
class SourceObject:
    """An S3 object as the snapshot took it: what an auditor compares with the bucket."""

    key: str
    size: int
    etag: str
    sha256: str


@dataclass(frozen=True)
class Item:
    """One image of an ingested dataset: a line of ``data_ingestion/items.jsonl``."""

    split: str  # train | val | test, or "all" when the source gives no split
    label: str
    ref: str  # path relative to the dataset root, or "split:index" inside an .npz
    sha256: str
    group: str | None = None  # the patient (ingestion.group_by); None: the image is its own group
    metadata: dict[str, str] = field(default_factory=dict)  # the metadata CSV's other columns (sex, view, site…)
    dicom: dict[str, str | int] | None = None  # DICOM attributes that decided the pixels (modality, window…)
    source: str = ""  # the manifest source it came from (``--data sources.yaml``); "" for a single source


@dataclass(frozen=True)
class SourceRecord:
    """One source of a manifest: where its films came from and which of the model's classes they became."""

    name: str
    uri: str  # the resolved folder or s3:// prefix
    classes: dict[str, str]  # the source's folder -> the model's class
    grouping: str  # how its films were grouped into patients
    counts: dict[str, int]  # the model's class -> films taken from this source


@dataclass(frozen=True)
class Spread:
    """One statistic over a dataset's films."""

    min: float
    median: float
    max: float


@dataclass(frozen=True)
class FlaggedFilm:
    """A film an input check flags (xray/data/quality.py), as the configured mode says."""

    ref: str
    split: str
    codes: tuple[str, ...]
    reasons: tuple[str, ...]
    refused: bool  # a check in refuse mode fired: excluded when ingestion.quality is exclude


@dataclass(frozen=True)
class QualityProfile:
    """What the films are like and what the input checks make of them: a degraded copy shows here."""

    films: int
    min_side: int  # the too_small check's side: the side the model will be trained at
    short_side: Spread  # pixels, at stored size
    bit_depth: dict[str, int]  # stored bits per sample -> films
    grey_levels: Spread  # distinct grey levels per film
    top_levels_share: Spread  # share of a film's pixels in its 16 most frequent grey levels
    sharpness: Spread  # variance of the Laplacian of the grey film at stored size
    check_share: dict[str, float]  # image check -> share of films it would refuse (every check on)
    flagged: tuple[FlaggedFilm, ...] = ()
    policy: str = "report"  # ingestion.quality
    excluded: int = 0
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class DataIngestionArtifact:
    header: ArtifactHeader
    source_uri: str
    source_kind: str  # folder | npz | s3 | demo | manifest
    dataset_path: str  # what transformation reads: a folder or .npz (absolute, or relative to the run dir)
    class_names: tuple[str, ...]
    splits_given: tuple[str, ...]  # splits the source itself defines, e.g. ("train", "test")
    counts: dict[str, dict[str, int]]  # split -> class -> images
    num_images: int
    data_fingerprint: str  # sha256 over every item's (split, label, content hash)
    index_file: str  # items.jsonl: one line per image: split, label, path/index, sha256
    median_image_side: int  # median of min(width, height): what "image_size: auto" resolves from
    unreadable: tuple[UnreadableFile, ...] = ()
    duplicates: tuple[DuplicateGroup, ...] = ()
    leakage: tuple[DuplicateGroup, ...] = ()  # duplicates that sit in different source splits
    s3_objects: tuple[SourceObject, ...] = ()
    grouping: str = "none"  # how images were grouped into patients (ingestion.group_by)
    num_groups: int = 0  # patients (or single images where no group is known)
    group_leakage: tuple[GroupLeak, ...] = ()  # patients whose films cross source splits
    metadata_columns: tuple[str, ...] = ()  # metadata CSV columns carried per image (sex, view, site…)
    dicom_images: int = 0  # how many images were DICOM (their attributes are in items.jsonl)
    quality: QualityProfile | None = None  # the input checks over every film; None: made before they existed
    sources: tuple[SourceRecord, ...] = ()  # a manifest's sources (empty for a single source)

    def dataset_root(self, run_path: Path) -> Path:
        """The folder or .npz the images are read from."""
        path = Path(self.dataset_path)
        return path if path.is_absolute() else run_path / path

    def read_items(self, run_path: Path) -> list[Item]:
        with open(run_path / self.index_file) as fh:
            return [Item(**json.loads(line)) for line in fh if line.strip()]


@dataclass(frozen=True)
class DataTransformationArtifact:
    """The splits as decoded arrays, and the normalisation and augmentation every model trains with."""

    header: ArtifactHeader
    class_names: tuple[str, ...]
    image_size: int
    channels: int
    split_strategy: str  # "source" or "stratified(seed=…, val=…, test=…)"
    counts: dict[str, dict[str, int]]
    arrays: dict[str, str]  # "train_x" -> run-relative path of an .npy (uint8 N×H×W), "train_y" -> labels
    normalization: dict[str, float]  # mean, std applied after scaling to [0, 1]
    augmentation: dict[str, float | bool]  # train-only, applied on the fly per batch
    grouped_by: str = "none"  # how val/test were carved: by patient group, or by image (duplicates together)
    # how the source's images were made from full-size films (MedMNIST .npz: centre square, 28 px, bicubic),
    # so serving and the external check shrink a full-size film the same way (see xray/data/preprocessing.py)
    source_crop: str = "none"
    source_size: int = 0
    source_filter: str = "bilinear"
    intensity: str = "none"  # none | equalize: applied to every array a model sees (the cached ones are as decoded)

    def load_array(self, run_path: Path, key: str) -> np.ndarray:
        """One cached array: ``train_x`` (uint8 N×H×W), ``train_y`` (int64 labels), ``val_x``, … ``test_y``."""
        import numpy as np

        return np.load(run_path / self.arrays[key])


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    val_roc_auc: float
    learning_rate: float
    seconds: float
    images_per_second: float


@dataclass(frozen=True)
class FoldScore:
    """One cross-validation fold: its best checkpoint scored on the fold's held-out part."""

    fold: int
    train_size: int
    val_size: int
    best_epoch: int
    epochs_run: int
    accuracy: float
    roc_auc: float
    macro_f1: float
    loss: float


@dataclass(frozen=True)
class CandidateModel:
    name: str
    checkpoint: str  # run-relative path of the best state_dict
    history: tuple[EpochRecord, ...]
    best_epoch: int
    monitor: str
    best_score: float
    parameters: int
    train_seconds: float
    images_per_second: float
    precision: str
    device: str
    stopped_early: bool
    cv_scores: tuple[float, ...] = ()  # per-fold validation scores when cv_folds >= 2
    world_size: int = 1  # processes that trained it (torchrun / DDP); 1: a single process
    cv_fold_metrics: tuple[FoldScore, ...] = ()  # per-fold metrics when cv_folds >= 2
    cv_final_model: str | None = None  # ensemble | retrain | best_fold, when cross-validated
    cv_retrain_epochs: int | None = None  # epochs of the retrain on train+val (mean best epoch over folds)
    stopped_by_budget: bool = False  # the wall-clock guard ended it: the next epoch would have overrun trainer.time_budget
    members: tuple[str, ...] = ()  # a k-fold bag (trainer.cv_final_model ensemble): its fold models, in state_dict order
    batch_size: int = 0  # what it trained with: trainer.batch_size, halved for a small dataset (min_steps_per_epoch)
    learning_rate: float = 0.0  # likewise (scaled with the batch by its square root)


@dataclass(frozen=True)
class CandidateTiming:
    """A few training steps of one candidate timed on this machine, before training (after a warm-up step)."""

    name: str
    image_size: int
    batch_size: int  # per process
    seconds_per_step: float  # forward + backward + optimizer step, augmentation included
    eval_images_per_second: float  # forward passes: precise BatchNorm and validation
    seconds_per_epoch: float  # steps + precise BatchNorm + validation (x folds + 1 when cross-validating)
    measured: bool = True  # False: scaled by pixel count from a measurement at another size (measuring was too slow)


@dataclass(frozen=True)
class CandidatePlan:
    name: str
    wanted_epochs: int  # trainer.epochs, stretched by trainer.min_steps
    planned_epochs: int  # what fits the budget
    planned_seconds: float


@dataclass(frozen=True)
class DroppedCandidate:
    """A candidate the time budget could not fit, and why."""

    name: str
    reason: str


@dataclass(frozen=True)
class TrainingPlan:
    """How trainer.time_budget was spent: the measurements, the epochs per candidate, and every cut with its reason."""

    time_budget_s: float
    training_target_s: float  # training time left after measuring (TRAINING_SHARE of the budget, less planning)
    capability: str  # Capability.describe() of the machine that measured
    source_image_size: int  # the transformation's size
    image_size: int  # the size trained at (smaller than the source when the budget demanded it)
    steps_per_epoch: int
    timings: tuple[CandidateTiming, ...]  # every measurement, including sizes later given up
    candidates: tuple[CandidatePlan, ...]
    dropped: tuple[DroppedCandidate, ...] = ()
    decisions: tuple[str, ...] = ()  # image-size reductions and shortened schedules, in order
    planning_seconds: float = 0.0


@dataclass(frozen=True)
class ModelTrainerArtifact:
    header: ArtifactHeader
    architecture_input: dict[str, int]  # image_size, channels, num_classes
    candidates: tuple[CandidateModel, ...]
    cross_validation: dict[str, str] = field(default_factory=dict)  # summary_csv, summary_json, assignment_csv
    plan: TrainingPlan | None = None  # None: trainer.time_budget is none


@dataclass(frozen=True)
class ClassMetrics:
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class SplitMetrics:
    accuracy: float
    roc_auc: float
    macro_f1: float
    loss: float
    ece: float
    per_class: dict[str, ClassMetrics]
    confusion_matrix: tuple[tuple[int, ...], ...]
    sensitivity: float | None = None  # 2-class only: recall of the positive (second) class
    specificity: float | None = None

    def value(self, metric: str) -> float:
        """``metric`` (accuracy, roc_auc, …) as a number to rank by: undefined counts as the worst."""
        value = getattr(self, metric)
        return -math.inf if value is None or math.isnan(value) else float(value)


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap 95 % percentile interval."""

    point: float
    lower: float
    upper: float


@dataclass(frozen=True)
class OperatingPoint:
    """The threshold on P(positive) = the summed probability of ``positive``, chosen on validation."""

    positive: tuple[str, ...]
    target_sensitivity: float
    threshold: float
    validation_sensitivity: float
    validation_specificity: float
    test_sensitivity: float
    test_specificity: float


@dataclass(frozen=True)
class SubgroupMetrics:
    """Test metrics for the images sharing one value of a metadata column (sex=F, view=AP, site=B…)."""

    column: str
    value: str
    count: int
    class_counts: dict[str, int]
    small: bool  # fewer than evaluation.subgroup_min_count images, or a class missing: read with care
    intervals: dict[str, Interval]  # accuracy, roc_auc, sensitivity, specificity (when defined)


@dataclass(frozen=True)
class Calibration:
    """Temperature scaling fitted on validation; top-label ECE before and after it, on validation and test.

    ``temperature`` 1.0 with method ``none``: evaluation.calibration was none.
    """

    method: str  # temperature | none
    temperature: float
    val_ece_before: float
    val_ece_after: float
    test_ece_before: float
    test_ece_after: float


@dataclass(frozen=True)
class ExportCheck:
    """One exported graph (``xray.serving.runtime``) checked against eager fp32 PyTorch on the validation films."""

    file: str  # in the pusher's stage folder, and by this name in the model directory
    sha256: str  # serving refuses a graph file that differs, as it refuses weights that differ
    precision: str  # fp32 | int8
    runtime: str  # the runtime the check ran it in (onnxruntime | openvino): it serves only there
    films: int
    top1_agreement: float
    max_prob_diff: float
    passed: bool  # only a passing graph is served
    reason: str


@dataclass(frozen=True)
class RuntimeExport:
    """The ONNX export made at push: the fp32 graph and, where made, its int8 quantization, each checked."""

    format: str  # onnx
    opset: int
    graphs: tuple[ExportCheck, ...]  # one check per graph file and runtime, fp32 first
    min_agreement: float  # the check's bars, as they were when it ran
    max_prob_diff: float

    def servable(self, precision: str, runtime: str | None = None) -> ExportCheck | None:
        """The check that lets the ``precision`` graph serve in ``runtime`` (any runtime: None), if it passed."""
        return next(
            (g for g in self.graphs if g.precision == precision and g.passed and runtime in (None, g.runtime)), None
        )


@dataclass(frozen=True)
class RefusedFilm:
    """A film of the run's own test split that the OOD score refused: in-distribution, so an auditor looks at it."""

    ref: str  # the film's path in the snapshot (splits.jsonl ``ref``)
    label: str
    score: float  # the (combined) OOD score; above the gate's threshold


@dataclass(frozen=True)
class OODGate:
    """The model's own OOD score as shipped (``xray.models.ood``): ``score <= threshold`` is accepted."""

    method: str  # mahalanobis: smallest class-conditional distance, shared LedoitWolf covariance (Lee et al. 2018)
    acceptance: float  # evaluation.ood_acceptance: the share of validation films the threshold accepts
    threshold: float
    member_thresholds: tuple[float, ...]  # each member's own threshold on its squared distance
    feature_dims: tuple[int, ...]  # penultimate feature size per member
    file: str  # the statistics (.npz): run-relative in evaluation, the file name in a model directory
    sha256: str  # of that file; serving refuses a file that differs
    validation_accepted: float  # measured share accepted: validation (about ``acceptance``) and test
    test_accepted: float
    # evaluation.external's films accepted by this score, per source name (the input checks come on top at serving)
    external_accepted: dict[str, float] = field(default_factory=dict)
    confidence: float = 0.0  # evaluation.ood_confidence: the fitted quantile's upper bound at this confidence; 0: none
    test_refused: tuple[RefusedFilm, ...] = ()  # the test films behind ``test_accepted`` < 1, highest score first


@dataclass(frozen=True)
class OODSuiteKind:
    """One kind of the OOD suite (``xray.evaluation.ood_suite``) through the serving predict path."""

    kind: str
    count: int
    refused: int
    refused_by_ood_score: int  # of those, refused (also) by the model's own score

    @property
    def refusal_rate(self) -> float:
        return self.refused / self.count if self.count else float("nan")


@dataclass(frozen=True)
class ExternalClassResult:
    """One model class on one external source (or pooled over every source): how many films, how many named right."""

    model_class: str
    films: int  # 0: no external films of this class here (nothing to measure, not gated)
    correct: int
    recall: float | None  # None when films == 0
    misses: dict[str, int] = field(default_factory=dict)  # what the missed films were called: model class -> films
    roc_auc: float | None = None  # one-vs-rest against the other classes present; None where fewer than two are
    folders: tuple[str, ...] = ()  # the source's folders mapped to this class (pooled: "source/folder")
    # 95 % Wilson interval on recall: 38 of 50 is 0.76 but could be 0.63 or 0.86, so one run rarely settles a bar
    recall_interval: tuple[float, float] | None = None

    def misses_text(self) -> str:
        """What the missed films were called, most first: "Covid 149, Viral Pneumonia 1" ("" where none were missed)."""
        return ", ".join(f"{name} {n}" for name, n in sorted(self.misses.items(), key=lambda kv: -kv[1]))

    def interval_text(self) -> str:
        """The recall's interval as every report prints it: "[0.626, 0.857]", or "-" where there is none."""
        return "-" if self.recall_interval is None else f"[{self.recall_interval[0]:.3f}, {self.recall_interval[1]:.3f}]"


@dataclass(frozen=True)
class ExternalSourceResult:
    """One external source (evaluation.external[i]) scored through serving's path."""

    uri: str
    name: str  # the folder's name: how tables and gate reasons call the source
    classes: dict[str, str]  # folder -> model class, as resolved (the config's map, or the folders named like classes)
    films: int
    per_class: tuple[ExternalClassResult, ...]  # the classes this source has films of, in model class order
    roc_auc: float | None = None  # macro one-vs-rest over the classes present; None where fewer than two are
    unreadable: tuple[str, ...] = ()  # images that could not be decoded, skipped


@dataclass(frozen=True)
class ExternalCheck:
    """One model on every external source: per source and class, pooled per class, and the classes nobody covers."""

    sources: tuple[ExternalSourceResult, ...]
    pooled: tuple[ExternalClassResult, ...]  # every model class, films 0 where no source has any
    no_external_films: tuple[str, ...] = ()  # model classes with no external film in any source
    roc_auc: float | None = None  # pooled over sources, macro one-vs-rest over the classes present

    def worst(self) -> tuple[str, ExternalClassResult] | None:
        """(source name, class result) with the lowest recall over every source and class with films."""
        rows = [(s.name, c) for s in self.sources for c in s.per_class if c.recall is not None]
        return min(rows, key=lambda row: row[1].recall) if rows else None


@dataclass(frozen=True)
class ShortcutProbe:
    """Can the label be told without the lungs? One probe's cross-validated balanced accuracy, rescaled to a score."""

    name: str  # acquisition | masked_lungs
    films: int  # train+val films it was scored on
    balanced_accuracy: float
    score: float  # (balanced accuracy - 1/C) / (1 - 1/C) over C classes: 0 chance, 1 perfect
    method: str  # what it looked at and how it was scored, in words
    groups: dict[str, float] = field(default_factory=dict)  # acquisition: the score of each feature group alone
    note: str = ""  # what it could not look at (an .npz source has no files)


@dataclass(frozen=True)
class ShortcutCheck:
    """Both shortcut probes, their maximum, and the plain-language warning when it passes ``warn_at``."""

    probes: tuple[ShortcutProbe, ...]
    score: float  # the highest probe score
    warn_at: float  # evaluation.shortcut_warn
    warning: str = ""  # empty: no probe passed warn_at

    def probe(self, name: str) -> ShortcutProbe | None:
        return next((p for p in self.probes if p.name == name), None)


@dataclass(frozen=True)
class CandidateEvaluation:
    name: str
    validation: SplitMetrics
    test: SplitMetrics
    plots: dict[str, str] = field(default_factory=dict)
    checkpoint: str = ""  # run-relative weights (the trainer's, or the ensemble's written by evaluation)
    members: tuple[str, ...] = ()  # an ensemble's member models (candidates, or a k-fold bag's folds), in state_dict order
    tta: tuple[str, ...] = ()  # test-time views used for every score below (and by serving)
    external: ExternalCheck | None = None  # the external checks (evaluation.external), when configured
    calibration: Calibration | None = None  # the metrics above are of the calibrated probabilities


@dataclass(frozen=True)
class BootstrapComparison:
    """``leader`` minus ``runner_up`` on ``metric``: the full-set difference and its bootstrap interval."""

    leader: str
    runner_up: str
    metric: str
    difference: float
    low: float
    high: float
    level: float
    resamples: int
    cannot_tell: bool  # the interval reaches zero: validation cannot rank the two


@dataclass(frozen=True)
class EnsembleDecision(BootstrapComparison):
    """Why the ensemble was or was not chosen: the bootstrap comparison of the best two members, and the verdict."""

    chosen: bool
    reason: str


@dataclass(frozen=True)
class ModelEvaluationArtifact:
    header: ArtifactHeader
    selection_metric: str
    best_candidate: str
    best_checkpoint: str
    candidates: tuple[CandidateEvaluation, ...]
    comparison_markdown: str
    comparison_json: str
    plots: dict[str, str]  # name -> run-relative PNG path
    gradcam: tuple[str, ...] = ()
    selection_basis: str = "validation"  # validation | cross_validation (mean over folds on train+val)
    cross_validation: dict[str, dict[str, float]] = field(default_factory=dict)  # candidate -> mean, std, folds
    operating_point: OperatingPoint | None = None  # of the chosen candidate
    intervals: dict[str, Interval] = field(default_factory=dict)  # chosen candidate, test: bootstrap 95 % CIs
    bootstrap: dict[str, int] = field(default_factory=dict)  # resamples, seed
    subgroups: tuple[SubgroupMetrics, ...] = ()
    model_card_json: str = ""  # run-relative paths of the model card
    model_card_markdown: str = ""
    image_size: int = 0  # the size the models were trained and scored at (0: the transformation's)
    ensemble: EnsembleDecision | None = None
    ood: OODGate | None = None  # of the chosen candidate; None where evaluation.ood is none
    ood_suite: tuple[OODSuiteKind, ...] = ()  # refusals per kind of the OOD suite, chosen candidate
    shortcut: ShortcutCheck | None = None  # the chosen model's shortcut probes (None: too few films to cross-validate)

    def chosen(self) -> CandidateEvaluation:
        """The chosen candidate's evaluation (``best_candidate``)."""
        return next(c for c in self.candidates if c.name == self.best_candidate)

    def external_check(self) -> ExternalCheck | None:
        """The chosen candidate's external checks (None: evaluation.external is empty)."""
        return self.chosen().external


@dataclass(frozen=True)
class ModelPusherArtifact:
    header: ArtifactHeader
    pushed: bool
    candidate: str
    reasons: tuple[str, ...]
    model_tag: str | None = None
    production_before: str | None = None
    production_score: float | None = None
    candidate_score: float | None = None
    s3_uris: tuple[str, ...] = ()
    evidence_seal: str | None = None  # digest of model_pusher/evidence_seal.json, also in the model's metadata


ARTIFACT_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        DataIngestionArtifact,
        DataTransformationArtifact,
        ModelTrainerArtifact,
        ModelEvaluationArtifact,
        ModelPusherArtifact,
    )
}
