"""The shortcut check: does the label follow from how the films were made rather than from the lungs?

A dataset assembled from several sources can carry its labels in the way the
films were made: Covid films from adult hospitals as large JPEGs, normal films
from a children's hospital as small PNGs. A model then learns the source, not
the disease, and looks perfect on its own test split. This check needs no
external data; it asks two questions of train+val, each scored by stratified
5-fold cross-validation (fixed seed):

- **acquisition**: a depth-6 decision tree (scikit-learn) on how each film
  was stored and exposed:
  stored width, height and aspect ratio, file format and extension, PIL mode and
  bit depth, file bytes per pixel, DICOM tags (modality, manufacturer,
  photometric interpretation, bits stored), whether EXIF is present, a coarse
  intensity histogram, and the mean and spread of the outer strips and the four
  corners. None of these is the lungs; if they name the class, the labels follow
  the sources. An ``.npz`` source has no files: only the pixel features are used.
- **masked_lungs**: the chosen model on films whose central box (the middle
  60 % of the width and 70 % of the height, where the lungs are) is filled with
  the mean of the rest of the film. A model that still names the class with the lungs hidden is
  reading something else: text, markers, collimation, body size. Scored two ways,
  the higher kept: the model's own answers, and a logistic readout of its masked
  outputs fitted per fold (masking can shift every answer towards one class and
  hide that the outputs still carry the label).

Each probe's score is (balanced accuracy - 1/C) / (1 - 1/C) for C classes:
0 is chance, 1 is perfect. Past ``evaluation.shortcut_warn`` (default 0.5,
halfway from chance to perfect without looking at the lungs) the model card
and the comparison carry a plain warning; ``gate.max_shortcut_score`` can refuse
the push. The masked probe scores train films the model was trained on, so it
reads high when the model memorised the film borders too: that is also a
model not reading the lungs. Both probes use at most ``MAX_FILMS`` films.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from xray.entity.artifact_entity import ShortcutCheck, ShortcutProbe
from xray.data.dicom import is_dicom

logger = logging.getLogger(__name__)

FOLDS, SEED = 5, 0
TREE_DEPTH = 6  # the acquisition probe's decision tree
MAX_FILMS = 4000  # a stratified subsample beyond this: the probes stay a small share of the evaluation
MASK_WIDTH, MASK_HEIGHT = 0.6, 0.7  # the central box hidden by the masked probe, as shares of the film
HISTOGRAM_BINS = 16
STRIP, CORNER = 0.08, 0.12  # border strip width and corner square side, as shares of the film's side
_BITS = {"1": 1, "L": 8, "P": 8, "LA": 8, "RGB": 8, "RGBA": 8, "CMYK": 8, "YCbCr": 8, "I;16": 16, "I;16B": 16, "I;16L": 16, "I": 32, "F": 32}
FILE_GROUPS = ("stored size", "file format", "mode and bit depth", "file bytes per pixel", "DICOM tags", "EXIF")
PIXEL_GROUPS = ("intensity histogram", "border and corners")
Features = dict[str, tuple[str, float | str | None]]  # name -> (group, value); str values are categories


def score_of(balanced_accuracy: float, n_classes: int) -> float:
    """Balanced accuracy rescaled so 0 is chance (1/C) and 1 is perfect."""
    chance = 1.0 / n_classes
    return (balanced_accuracy - chance) / (1.0 - chance)


def file_features(path: Path) -> Features:
    """How the film was stored, from its header alone (no pixel decoding)."""
    size = path.stat().st_size
    out: Features = {"extension": ("file format", path.suffix.lower())}
    width = height = None
    if is_dicom(path):
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True)
        width, height = int(ds.get("Columns", 0)) or None, int(ds.get("Rows", 0)) or None
        bits = int(ds.get("BitsStored", 0)) or None
        out.update({
            "format": ("file format", "DICOM"), "mode": ("mode and bit depth", str(ds.get("PhotometricInterpretation", ""))),
            "bits": ("mode and bit depth", bits), "exif": ("EXIF", 0.0),
            "dicom_modality": ("DICOM tags", str(ds.get("Modality", ""))),
            "dicom_manufacturer": ("DICOM tags", str(ds.get("Manufacturer", ""))),
            "dicom_photometric": ("DICOM tags", str(ds.get("PhotometricInterpretation", ""))),
            "dicom_bits_stored": ("DICOM tags", bits),
        })
    else:
        from PIL import Image

        with Image.open(path) as image:  # lazy: the header, not the pixels
            width, height = image.size
            out.update({
                "format": ("file format", image.format or ""), "mode": ("mode and bit depth", image.mode),
                "bits": ("mode and bit depth", _BITS.get(image.mode)),
                "exif": ("EXIF", float(bool(image.info.get("exif")) or bool(image.getexif()))),
            })
    if width and height:
        out.update({
            "width": ("stored size", float(width)), "height": ("stored size", float(height)),
            "aspect": ("stored size", width / height), "log_pixels": ("stored size", math.log(width * height)),
            "bytes_per_pixel": ("file bytes per pixel", size / (width * height)),
        })
    return out


def pixel_features(pixels: np.ndarray) -> Features:
    """A coarse intensity histogram and the outer strips' and corners' mean and spread of one uint8 film."""
    height, width = pixels.shape
    values = pixels.astype(np.float32) / 255.0
    histogram = np.histogram(values, bins=HISTOGRAM_BINS, range=(0.0, 1.0))[0] / values.size
    out: Features = {f"histogram_{i}": ("intensity histogram", float(v)) for i, v in enumerate(histogram)}
    s, c = max(1, round(STRIP * min(height, width))), max(1, round(CORNER * min(height, width)))
    regions = {
        "top": values[:s], "bottom": values[-s:], "left": values[:, :s], "right": values[:, -s:],
        "corner_tl": values[:c, :c], "corner_tr": values[:c, -c:], "corner_bl": values[-c:, :c], "corner_br": values[-c:, -c:],
    }
    for name, region in regions.items():
        out[f"{name}_mean"] = ("border and corners", float(region.mean()))
        out[f"{name}_std"] = ("border and corners", float(region.std()))
    return out


def feature_matrix(rows: list[Features]) -> tuple[np.ndarray, list[str], list[str]]:
    """(X with NaN for missing and categories as sorted codes, feature names, their groups)."""
    names = sorted({name for row in rows for name in row})
    groups = {name: group for row in rows for name, (group, _) in row.items()}
    x = np.full((len(rows), len(names)), np.nan, dtype=np.float64)
    for j, name in enumerate(names):
        values = [row[name][1] if name in row else None for row in rows]
        if any(isinstance(v, str) for v in values):
            vocabulary = {v: float(i) for i, v in enumerate(sorted({str(v) for v in values if v is not None}))}
            x[:, j] = [np.nan if v is None else vocabulary[str(v)] for v in values]
        else:
            x[:, j] = [np.nan if v is None else float(v) for v in values]
    return x, names, [groups[n] for n in names]


def _folds(labels: np.ndarray):
    """Stratified K-fold with the fixed seed; None when a class has fewer than two films."""
    from sklearn.model_selection import StratifiedKFold

    smallest = np.bincount(labels)[np.unique(labels)].min()
    if len(np.unique(labels)) < 2 or smallest < 2:
        return None
    return StratifiedKFold(n_splits=int(min(FOLDS, smallest)), shuffle=True, random_state=SEED)


def cv_balanced_accuracy(x: np.ndarray, labels: np.ndarray) -> float | None:
    """Out-of-fold balanced accuracy of a depth-limited decision tree on ``x``; None when folds cannot be made.

    A tree, not a boosted ensemble: a shortcut is a strong, simple rule (one file format, one size, a bright
    corner), which a tree finds in milliseconds; it handles missing values and category codes as they are.
    """
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import cross_val_predict
    from sklearn.tree import DecisionTreeClassifier

    folds = _folds(labels)
    if folds is None:
        return None
    leaf = int(max(2, min(20, len(labels) // 50)))
    model = DecisionTreeClassifier(max_depth=TREE_DEPTH, min_samples_leaf=leaf, class_weight="balanced", random_state=SEED)
    predicted = cross_val_predict(model, x, labels, cv=folds)
    return float(balanced_accuracy_score(labels, predicted))


def subsample(labels: np.ndarray, limit: int = MAX_FILMS) -> np.ndarray:
    """Indices of at most ``limit`` films, stratified by class, fixed seed (all of them when there are fewer)."""
    if len(labels) <= limit:
        return np.arange(len(labels))
    from sklearn.model_selection import train_test_split

    kept, _ = train_test_split(np.arange(len(labels)), train_size=limit, stratify=labels, random_state=SEED)
    return np.sort(kept)


def acquisition_probe(paths: list[Path | None], pixels: np.ndarray, labels: np.ndarray, n_classes: int) -> ShortcutProbe | None:
    """Probe (a): how well acquisition features alone name the class; ``paths`` None where there is no file (.npz)."""
    rows = [{**(file_features(p) if p is not None else {}), **pixel_features(image)} for p, image in zip(paths, pixels)]
    x, names, groups = feature_matrix(rows)
    overall = cv_balanced_accuracy(x, labels)
    if overall is None:
        return None
    by_group = {}
    for group in (*FILE_GROUPS, *PIXEL_GROUPS):
        columns = [j for j, g in enumerate(groups) if g == group and not np.isnan(x[:, j]).all()]
        if columns:
            alone = cv_balanced_accuracy(x[:, columns], labels)
            by_group[group] = round(score_of(alone, n_classes), 4) if alone is not None else 0.0
    no_files = all(p is None for p in paths)
    return ShortcutProbe(
        name="acquisition", films=len(labels), balanced_accuracy=overall, score=score_of(overall, n_classes),
        method=(f"a depth-{TREE_DEPTH} decision tree on {len(names)} acquisition features, stratified {FOLDS}-fold "
                f"cross-validation (seed {SEED}) on train+val"),
        groups=by_group,
        note="the source is an .npz: no files, so only the pixel features (histogram, borders, corners)" if no_files else "",
    )


def mask_center(pixels: np.ndarray) -> np.ndarray:
    """Films with the central box (``MASK_WIDTH`` × ``MASK_HEIGHT`` of each side) filled with the mean outside it.

    The fill is the mean of what stays visible, not of the whole film, so the hidden lungs leak nothing
    (not even their overall brightness) into the masked film.
    """
    n, height, width = pixels.shape
    h, w = round(MASK_HEIGHT * height), round(MASK_WIDTH * width)
    top, left = (height - h) // 2, (width - w) // 2
    box = np.zeros((height, width), dtype=bool)
    box[top : top + h, left : left + w] = True
    masked = pixels.copy()
    means = np.rint(pixels[:, ~box].mean(axis=1)).astype(np.uint8)
    masked[:, box] = np.repeat(means[:, None], int(box.sum()), axis=1)
    return masked


def masked_probe(
    predict: Callable[[np.ndarray], np.ndarray], pixels: np.ndarray, labels: np.ndarray, n_classes: int
) -> ShortcutProbe | None:
    """Probe (b): the chosen model with the lungs hidden; its own answers, and a per-fold readout of its outputs.

    ``predict``: the chosen model's class probabilities for a batch of films (one pass, no test-time views),
    as the evaluation stage computes them.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import cross_val_predict

    folds = _folds(labels)
    if folds is None:
        return None
    probs = predict(mask_center(pixels))
    direct = float(balanced_accuracy_score(labels, probs.argmax(axis=1)))
    readout = LogisticRegression(max_iter=1000, class_weight="balanced")
    logits = np.log(np.clip(probs, 1e-7, 1.0))
    refit = float(balanced_accuracy_score(labels, cross_val_predict(readout, logits, labels, cv=folds)))
    best = max(direct, refit)
    return ShortcutProbe(
        name="masked_lungs", films=len(labels), balanced_accuracy=best, score=score_of(best, n_classes),
        method=(f"the chosen model on train+val films with the central {MASK_WIDTH:.0%} of the width and "
                f"{MASK_HEIGHT:.0%} of the height filled with the mean outside it; balanced accuracy of its own answers "
                f"({direct:.4f}) or of a logistic readout of its outputs, {FOLDS}-fold cross-validated ({refit:.4f}), the higher"),
    )


def shortcut_check(probes: list[ShortcutProbe | None], warn_at: float) -> ShortcutCheck | None:
    """Both probes, their maximum, and the plain-language warning for each probe past ``warn_at``."""
    kept = tuple(p for p in probes if p is not None)
    if not kept:
        return None
    warnings = [_warning(p) for p in kept if p.score > warn_at]
    warning = ""
    if warnings:
        warning = ("Shortcut warning: the label can be told without looking at the lungs. " + " ".join(warnings)
                   + f" (score: 0 chance, 1 perfect; warned above {warn_at}). Check the model on films from other sources "
                   "(evaluation.external) before trusting it.")
    return ShortcutCheck(probes=kept, score=max(p.score for p in kept), warn_at=warn_at, warning=warning)


def _warning(probe: ShortcutProbe) -> str:
    if probe.name == "acquisition":
        strongest = max(probe.groups.items(), key=lambda kv: kv[1], default=None)
        hint = f"; strongest alone: {strongest[0]} {strongest[1]:.2f}" if strongest else ""
        return (f"How the films were made (size, format, bit depth, tags, exposure, borders) names the class: "
                f"score {probe.score:.2f}{hint}.")
    return f"With the central lung region hidden, the chosen model still names the class: score {probe.score:.2f}."


PROBE_NAMES = {"acquisition": "acquisition features", "masked_lungs": "lungs masked"}


def shortcut_markdown(check: ShortcutCheck) -> list[str]:
    """The probes as markdown: score, balanced accuracy, how, and the warning when there is one."""
    lines = [
        f"Shortcut check (score 0 = chance, 1 = perfect; warned above {check.warn_at}): max {check.score:.4f}", "",
        "| probe | films | balanced accuracy | score | how |", "|---|---|---|---|---|",
    ]
    for p in check.probes:
        how = p.method + (f"; {p.note}" if p.note else "")
        if p.groups:
            how += "; each group alone: " + ", ".join(f"{g} {v:.2f}" for g, v in p.groups.items())
        lines.append(f"| {PROBE_NAMES.get(p.name, p.name)} | {p.films} | {p.balanced_accuracy:.4f} | {p.score:.4f} | {how} |")
    if check.warning:
        lines += ["", f"**{check.warning}**"]
    return lines
