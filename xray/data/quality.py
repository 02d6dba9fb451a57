"""Checks on what came in, before any model judges it: each failed check is a ``Finding`` with a reason.

A classifier answers every input with a label, so what it cannot judge has
to be turned away before it: a CT slice, a photograph, a flat or colour
image, a film too small for the model, one stored inverted or turned on its
side. The checks read DICOM attributes (pydicom) and plain statistics of the
one decode that training and serving share (``decode_image``): nothing is
decoded twice. ``action`` comes from ``InputGateConfig``: refuse, warn, or the
check is off.

The inverted and rotated checks score the layout every upright frontal chest
film shares, on a 64-pixel standardised copy: a bright vertical band (spine
and mediastinum) between darker lung fields, a darker frame, a brighter lower
part (diaphragm, abdomen), left-right mirror symmetry and mostly horizontal
edges (ribs). Inverting the grey scale flips the sign of the polarity score;
turning the film by 90 degrees flips the sign of the orientation score; turning
it upside down (180 degrees) flips the sign of the uprightness score, the lower
part's brightness over the upper part's. Their
margins were set on real films (``scripts/measure_input_checks.py``,
``docs/input-gate.md``).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from xray.data.preprocessing import (
    DEFAULT_MAX_PIXELS,
    DecodedImage,
    Preprocessing,
    decode_image,
    resize_square,
    resolve_image_size,
)
from xray.data.sources.npz import load_npz_split, npz_grey
from xray.entity.artifact_entity import FlaggedFilm, Item, QualityProfile, Spread
from xray.entity.config_entity import InputGateConfig, PipelineConfig

logger = logging.getLogger(__name__)

MODES = ("refuse", "warn", "off")
IMAGE_CHECKS = ("too_small", "nearly_constant", "posterized", "colour", "inverted", "rotated", "upside_down")
DICOM_CHECKS = ("dicom_modality", "dicom_body_part", "dicom_view", "dicom_photometric")
PROJECTION_MODALITIES = ("CR", "DX", "DR")  # DR is not a DICOM defined term, but some systems write it
CHEST_BODY_PARTS = ("CHEST", "THORAX", "LUNG")
FRONTAL_VIEWS = ("PA", "AP")
LATERAL_VIEWS = ("LL", "RL", "LATERAL", "LAT", "RLAT", "LLAT")
GREY_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2")
FALLBACK_MIN_SIDE = 28  # no model given: the smallest training input the pipeline knows (MedMNIST)
_WORK = 64  # the layout scores' working size
_MODALITY_NAMES = {
    "CT": "a CT slice", "MR": "an MR image", "US": "ultrasound", "NM": "nuclear medicine", "PT": "PET",
    "MG": "a mammogram", "XA": "angiography", "RF": "fluoroscopy", "OT": "another modality", "SC": "a secondary capture",
    "RTIMAGE": "a radiotherapy image", "OP": "an eye photograph", "XC": "a photograph", "IO": "a dental X-ray",
}


@dataclass(frozen=True)
class Finding:
    """One failed check."""

    code: str  # machine-readable: one of IMAGE_CHECKS or DICOM_CHECKS
    message: str  # plain-language reason for a person
    action: str  # refuse | warn (from the config)


@dataclass(frozen=True)
class ImageStats:
    """The plain statistics the image checks decide on (and the ingestion profile reports)."""

    height: int
    width: int
    std: float  # grey standard deviation, 0..255
    grey_levels: int  # distinct grey values
    top_levels_share: float  # share of the pixels in the 16 most frequent grey values
    colour_share: float  # share of pixels whose channels differ by more than the configured spread
    polarity: float  # > 0: bright spine between dark lungs (as a radiograph is shown); < 0: inverted
    orientation: float  # > 0: upright (or upside down); < 0: turned by 90 or 270 degrees
    uprightness: float = 0.0  # > 0: lower part brighter (diaphragm, abdomen), as upright; < 0: upside down


def refused(findings: list[Finding]) -> bool:
    """True when any finding refuses the input (warnings alone let it through)."""
    return any(f.action == "refuse" for f in findings)


def model_side(contract: Preprocessing) -> int:
    """The short side a model's training films had: a smaller upload holds less than the model learnt from."""
    return contract.source_size or contract.image_size


def check_file(
    data: bytes | Path, config: InputGateConfig, min_side: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS
) -> list[Finding]:
    """Decode once, as training and serving do (``decode_image``), and run every check on it."""
    return check_decoded(decode_image(data, max_pixels), config, min_side)


def check_decoded(decoded: DecodedImage, config: InputGateConfig, min_side: int = 0) -> list[Finding]:
    """The DICOM checks (when the film is DICOM), then the image checks, on one decode."""
    findings = check_dicom(decoded.dataset, config) if decoded.dataset is not None else []
    colour_stored = any(f.code == "dicom_photometric" for f in findings)
    image = check_image(decoded.raw, decoded.grey, config, min_side)
    return findings + [f for f in image if not (colour_stored and f.code == "colour")]


def check_dicom(ds: Any, config: InputGateConfig) -> list[Finding]:
    """Modality, body part, view and photometric interpretation of a pydicom ``Dataset``."""
    findings: list[Finding] = []
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality not in PROJECTION_MODALITIES:
        what = _MODALITY_NAMES.get(modality, "not a projection radiograph") if modality else "not stated"
        _add(findings, config.dicom_modality, "dicom_modality",
             f"DICOM Modality is {modality or 'missing'} ({what}); this model reads chest radiographs (CR or DX)")
    body = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    if body and body not in CHEST_BODY_PARTS:
        _add(findings, config.dicom_body_part, "dicom_body_part",
             f"DICOM BodyPartExamined is {body}; this model reads chest films")
    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    if view in LATERAL_VIEWS:
        _add(findings, config.lateral, "dicom_view",
             f"DICOM ViewPosition is {view} (a lateral film); this model was trained on frontal (PA or AP) films")
    elif view and view not in FRONTAL_VIEWS:
        _add(findings, config.dicom_view, "dicom_view",
             f"DICOM ViewPosition is {view}; this model reads frontal (PA or AP) chest films")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "").strip().upper()
    if photometric not in GREY_PHOTOMETRIC:
        _add(findings, config.dicom_photometric, "dicom_photometric",
             f"DICOM PhotometricInterpretation is {photometric or 'missing'}: a colour image; radiographs are "
             "stored MONOCHROME1 or MONOCHROME2")
    return findings


def check_image(
    raw: Image.Image | np.ndarray, grey: np.ndarray, config: InputGateConfig, min_side: int = 0
) -> list[Finding]:
    """The checks every image gets. ``raw``: as decoded, before grey conversion; ``grey``: uint8 H×W.

    ``min_side``: the model's training side (``model_side``); ``config.min_side`` overrides it.
    """
    return findings_from_stats(image_stats(raw, grey, config.colour_spread), config, min_side)


def findings_from_stats(stats: ImageStats, config: InputGateConfig, min_side: int = 0) -> list[Finding]:
    """The image checks' verdicts on measured statistics (shared by serving and the ingestion profile)."""
    findings: list[Finding] = []
    side = config.min_side or min_side or FALLBACK_MIN_SIDE
    if min(stats.height, stats.width) < side:
        _add(findings, config.too_small, "too_small",
             f"the image is {stats.width}x{stats.height} pixels; this model needs at least {side} pixels on the short side")
    if stats.std < config.min_std:
        _add(findings, config.nearly_constant, "nearly_constant",
             f"the image is nearly uniform (grey-level spread {stats.std:.1f} of 255): there is no film to read")
        return findings  # a flat image has no layout: polarity and orientation say nothing about it
    if stats.grey_levels < config.min_grey_levels or stats.top_levels_share >= config.max_top_levels_share:
        _add(findings, config.posterized, "posterized",
             f"the image has {stats.grey_levels} grey levels, {stats.top_levels_share:.0%} of its pixels in 16 of them: "
             "a radiograph has hundreds (a posterized copy, a drawing or a logo?)")
    if stats.colour_share > config.max_colour_share:
        _add(findings, config.colour, "colour",
             f"{stats.colour_share:.0%} of the pixels are coloured; a radiograph is grey")
    if stats.orientation < -config.rotated_margin:
        _add(findings, config.rotated, "rotated",
             f"the film looks turned on its side (rotated by 90 degrees; orientation score {stats.orientation:.2f})")
    if stats.polarity < -config.inverted_margin:
        _add(findings, config.inverted, "inverted",
             f"the film looks inverted (lungs bright, bones dark; polarity score {stats.polarity:.2f})")
    elif stats.uprightness < -config.upside_down_margin:  # inverting also flips it: one reason is enough
        _add(findings, config.upside_down, "upside_down",
             f"the film looks upside down (rotated by 180 degrees; uprightness score {stats.uprightness:.2f})")
    return findings


def _add(findings: list[Finding], mode: str, code: str, message: str) -> None:
    if mode != "off":
        findings.append(Finding(code=code, message=message, action=mode))


# ------------------------------------------------------------------ statistics


def image_stats(raw: Image.Image | np.ndarray, grey: np.ndarray, colour_spread: int = 24) -> ImageStats:
    """Plain statistics of one decoded image (cheap: the layout scores run on a 64-pixel copy)."""
    counts = np.bincount(grey.ravel(), minlength=256)
    polarity, orientation, uprightness = layout_scores(grey)
    return ImageStats(
        height=int(grey.shape[0]),
        width=int(grey.shape[1]),
        std=float(grey.std()),
        grey_levels=int(np.count_nonzero(counts)),
        top_levels_share=float(np.sort(counts)[-16:].sum() / max(grey.size, 1)),
        colour_share=colour_share(raw, colour_spread),
        polarity=polarity,
        orientation=orientation,
        uprightness=uprightness,
    )


def colour_share(raw: Image.Image | np.ndarray, spread: int) -> float:
    """Share of pixels whose colour channels differ by more than ``spread``, on a copy of at most 128 px."""
    if isinstance(raw, Image.Image):
        if raw.mode not in ("P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"):
            return 0.0
        small = raw.copy()
        small.thumbnail((128, 128))
        rgb = np.asarray(small.convert("RGB"), dtype=np.int16)
    else:
        if raw.ndim != 3 or raw.shape[-1] < 3:
            return 0.0
        step = max(1, max(raw.shape[:2]) // 128)
        rgb = np.asarray(raw[::step, ::step, :3], dtype=np.float64)
        top = float(rgb.max()) if rgb.size else 0.0
        rgb = rgb * (255.0 / top) if top > 255 else rgb  # 16-bit colour: compare on the 8-bit scale
    channel_spread = rgb.max(axis=-1) - rgb.min(axis=-1)
    return float(np.mean(channel_spread > spread)) if channel_spread.size else 0.0


def layout_scores(grey: np.ndarray) -> tuple[float, float, float]:
    """(polarity, orientation, uprightness) of a grey film on a standardised 64-pixel copy; see the module docstring."""
    work = resize_square(np.ascontiguousarray(grey), _WORK).astype(np.float64)
    z = (work - work.mean()) / (work.std() + 1e-6)
    band = _band_contrast(z)  # spine band minus lung fields, columns
    band_t = _band_contrast(z.T)  # the same across rows: large when the spine lies horizontal
    frame = np.concatenate([z[:4].ravel(), z[-4:].ravel(), z[4:-4, :4].ravel(), z[4:-4, -4:].ravel()]).mean()
    bottom_top = z[-16:].mean() - z[:16].mean()
    polarity = band - frame + bottom_top
    symmetry = _corr(z, z[:, ::-1]) - _corr(z, z[::-1, :])
    inner = z[4:-4, 4:-4]
    edges = np.log((np.abs(np.diff(inner, axis=1)).mean() + 1e-6) / (np.abs(np.diff(inner, axis=0)).mean() + 1e-6))
    orientation = abs(band) - abs(band_t) + symmetry + 2.0 * edges
    return float(polarity), float(orientation), float(bottom_top)


def _band_contrast(z: np.ndarray) -> float:
    """Mean of the central vertical band minus the mean of the two bands where the lungs lie (rows 8..56)."""
    rows = z[8:56]
    return float(rows[:, 26:38].mean() - np.concatenate([rows[:, 10:22], rows[:, 42:54]], axis=1).mean())


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (np.sqrt((a * a).sum() * (b * b).sum()) + 1e-9))


# ------------------------------------------------------------------ the training data's profile


@dataclass(frozen=True)
class FilmMeasure:
    """One ingested film's statistics and the image checks' verdicts on it."""

    ref: str
    split: str
    stats: ImageStats
    bit_depth: int
    sharpness: float
    every_check: tuple[str, ...]  # codes that fire with every check on
    findings: tuple[Finding, ...]  # under the configured modes


def profile_dataset(
    root: Path, kind: str, items: list[Item], config: PipelineConfig, median_side: int
) -> tuple[list[Item], QualityProfile]:
    """Ingestion's quality pass: every film decoded as training decodes it, checked, and profiled.

    Returns the items to keep (all of them unless ``ingestion.quality: exclude``) and the profile.
    """
    gate = config.input_gate
    side = min(median_side, resolve_image_size(config.transformation.image_size, median_side))
    every = replace(gate, **{check: "refuse" for check in IMAGE_CHECKS})
    load = _npz_loader(root) if kind == "npz" else _file_loader(root)

    def measure(item: Item) -> FilmMeasure:
        raw, grey, bits = load(item)
        stats = image_stats(raw, grey, gate.colour_spread)
        return FilmMeasure(
            ref=item.ref, split=item.split, stats=stats, bit_depth=bits, sharpness=laplacian_variance(grey),
            every_check=tuple(f.code for f in findings_from_stats(stats, every, side)),
            findings=tuple(findings_from_stats(stats, gate, side)),
        )

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        measures = list(pool.map(measure, items))
    profile = summarise(measures, side, config.ingestion.quality)
    for line in profile.warnings:
        logger.warning("quality: %s", line)
    if profile.policy == "exclude" and profile.excluded:
        refused_refs = {f.ref for f in profile.flagged if f.refused}
        items = [i for i in items if i.ref not in refused_refs]
    return items, profile


def summarise(measures: list[FilmMeasure], side: int, policy: str) -> QualityProfile:
    """The profile of measured films: spreads, each check's share, the flagged films and the warnings."""
    count = max(len(measures), 1)
    share = {check: sum(check in m.every_check for m in measures) / count for check in IMAGE_CHECKS}
    flagged = tuple(
        FlaggedFilm(
            ref=m.ref, split=m.split, codes=tuple(f.code for f in m.findings),
            reasons=tuple(f.message for f in m.findings), refused=refused(list(m.findings)),
        )
        for m in measures if m.findings
    )
    warnings = [f"{value:.0%} of the films fail the {check} check" for check, value in share.items() if value >= 0.05]
    if share["posterized"] >= 0.5:
        warnings.append("most films have few grey levels in flat patches: this looks like a posterized (degraded) copy")
    return QualityProfile(
        films=len(measures),
        min_side=side,
        short_side=_spread([min(m.stats.height, m.stats.width) for m in measures]),
        bit_depth={str(b): n for b, n in sorted(Counter(m.bit_depth for m in measures).items())},
        grey_levels=_spread([m.stats.grey_levels for m in measures]),
        top_levels_share=_spread([m.stats.top_levels_share for m in measures]),
        sharpness=_spread([m.sharpness for m in measures]),
        check_share={k: round(v, 6) for k, v in share.items()},
        flagged=flagged,
        policy=policy,
        excluded=sum(f.refused for f in flagged) if policy == "exclude" else 0,
        warnings=tuple(warnings),
    )


def laplacian_variance(grey: np.ndarray) -> float:
    """Sharpness: the variance of the 4-neighbour Laplacian (Pech-Pacheco et al. 2000), at stored size."""
    if min(grey.shape) < 3:
        return 0.0
    a = grey.astype(np.int32)
    lap = a[:-2, 1:-1] + a[2:, 1:-1] + a[1:-1, :-2] + a[1:-1, 2:] - 4 * a[1:-1, 1:-1]
    return float(lap.var())


def _spread(values: list[float]) -> Spread:
    if not values:
        return Spread(min=0.0, median=0.0, max=0.0)
    return Spread(min=round(float(np.min(values)), 4), median=round(float(np.median(values)), 4), max=round(float(np.max(values)), 4))


Loader = Callable[[Item], tuple[Any, np.ndarray, int]]  # item -> (raw, grey, stored bits per sample)


def _file_loader(root: Path) -> Loader:
    """Each file decoded at stored size by ``decode_image`` (unreadable files never became items)."""

    def load(item: Item) -> tuple[Any, np.ndarray, int]:
        decoded = decode_image(root / item.ref)
        bits = decoded.dicom.bits_stored if decoded.dicom is not None else _pil_bits(decoded.raw)
        return decoded.raw, decoded.grey, bits

    return load


def _npz_loader(root: Path) -> Loader:
    with np.load(root, allow_pickle=False) as archive:
        arrays = {s: load_npz_split(archive, s)[0] for s in ("train", "val", "test") if f"{s}_images" in archive.files}

    def load(item: Item) -> tuple[Any, np.ndarray, int]:
        split, index = item.ref.split(":")
        pixels = arrays[split][int(index)]
        return pixels, npz_grey(pixels), pixels.dtype.itemsize * 8

    return load


def _pil_bits(image: Any) -> int:
    return {"1": 1, "I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16, "I": 32, "F": 32}.get(getattr(image, "mode", "L"), 8)
