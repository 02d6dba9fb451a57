"""Synthetic chest-radiograph phantoms: the embedded default dataset.

SYNTHETIC DATA, FOR DEMOS AND TESTS ONLY. Nothing here comes from a patient
and nothing here is a medical image; a model trained on it learns the
phantom generator, not radiology, and must never be used on real patients.

Why it exists: ``make demo`` and the test suite run without internet access,
so the pipeline needs a labelled image folder it can build from nothing.
Each phantom is drawn with numpy alone: a dark background, a soft-tissue
thorax, two dark lung fields with diaphragm domes, a heart shadow, a bright
spine/mediastinum column, rib arcs and clavicles, low-frequency film
non-uniformity, film grain and a random exposure. The three classes differ
only in what is added inside the lungs:

* ``normal``: nothing; clear lungs.
* ``pneumonia``: one to three patchy, blotchy consolidations in ONE lung,
  usually in the lower zone.
* ``covid``: bilateral, peripheral, low-contrast ground-glass haze along the
  outer edges of BOTH lungs, heavier in the lower zones.

Severity, anatomy, positioning and exposure vary per image so that the task
is learnable but not trivial. Every image comes from its own generator,
``numpy.random.default_rng((seed, class_index, index))``, so an image depends
only on (seed, class, index, size): asking for more images per class adds
images without changing the earlier ones, and the same arguments give
byte-identical PNG files (with the same numpy, Pillow and zlib; a different
CPU's vectorised exp/tanh could in principle move a pixel by one level).

Public API: ``DEMO_CLASSES``, ``generate_demo_dataset`` (writes the folder),
``render_phantom`` (one image in memory) and ``nominal_lung_mask`` (a lung
region for pixel-level sanity checks).
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from xray.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

DEMO_CLASSES: tuple[str, ...] = ("covid", "normal", "pneumonia")

_MIN_SIZE = 32  # below this the ribs and lesions are sub-pixel
_README = "README.txt"

# Nominal (un-jittered) left/right lung geometry in normalised coordinates:
# x and y run from -1 to 1, x left to right on the image, y top to bottom.
# The patient's right lung is on the image left, as on a PA film.
_LUNG_CX = 0.42
_LUNG_CY = 0.0
_LUNG_AX = 0.31
_LUNG_AY = 0.62


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1], so the phantom scales with ``size``."""
    c = (np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0
    return c[None, :].repeat(size, 0), c[:, None].repeat(size, 1)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """Soft step used for every edge, so shapes have no aliased outlines."""
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _smoothstep(lo: float, hi: float, t: np.ndarray) -> np.ndarray:
    s = np.clip((t - lo) / (hi - lo), 0.0, 1.0)
    return s * s * (3.0 - 2.0 * s)


def _ellipse_r(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float, angle: float = 0.0
) -> np.ndarray:
    """Normalised elliptical radius: < 1 inside, 1 on the outline."""
    dx, dy = x - cx, y - cy
    ca, sa = np.cos(angle), np.sin(angle)
    u = (dx * ca + dy * sa) / ax
    v = (-dx * sa + dy * ca) / ay
    return np.sqrt(u * u + v * v)


def _soft_inside(r: np.ndarray, edge: float) -> np.ndarray:
    """Mask that is 1 well inside (r < 1) and fades out over ``edge`` of r."""
    return _sigmoid((1.0 - r) / edge)


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Zero-mean, unit-std gaussian-blurred white noise; ``sigma`` in normalised units.

    Blurring in the Fourier domain costs the same for any sigma, which keeps
    300 images well under a few seconds.
    """
    white = rng.standard_normal((size, size))
    sp = sigma * size / 2.0
    a = -2.0 * np.pi**2 * sp**2
    # The gaussian is separable, so its spectrum is an outer product.
    kernel = np.outer(np.exp(a * np.fft.fftfreq(size) ** 2), np.exp(a * np.fft.rfftfreq(size) ** 2))
    field = np.fft.irfft2(np.fft.rfft2(white) * kernel, s=(size, size))
    field -= field.mean()
    std = field.std()
    return field / std if std > 0 else field


def _lung_width(v: np.ndarray) -> np.ndarray:
    """Lung half-width along its height: narrow apex (v = -1), broad base (v = +1)."""
    return np.clip(0.95 + 0.2 * v - 0.2 * v * v, 0.3, 1.1)


class _Lung:
    """One lung field: its soft mask plus local coordinates lesions are placed in."""

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        side: int,
        rng: np.random.Generator,
        edge: float,
    ) -> None:
        # side: -1 = image left (patient's right), +1 = image right.
        self.side = side
        self.cx = side * _LUNG_CX * rng.uniform(0.94, 1.06)
        self.cy = _LUNG_CY + rng.uniform(-0.04, 0.04)
        self.ax = _LUNG_AX * rng.uniform(0.9, 1.1)
        self.ay = _LUNG_AY * rng.uniform(0.92, 1.06)
        # Apices lean towards the midline, as real lungs do.
        self.angle = side * np.deg2rad(rng.uniform(-2.0, 7.0))
        dx, dy = x - self.cx, y - self.cy
        ca, sa = np.cos(self.angle), np.sin(self.angle)
        u = (dx * ca + dy * sa) / self.ax
        v = (-dx * sa + dy * ca) / self.ay
        width = _lung_width(v)
        self.u = u / width  # -1..1 across the lung, sign = image left/right
        self.v = v  # -1 apex .. +1 base
        self.r = np.sqrt(self.u**2 + v**2)
        # Diaphragm dome pushes the base up medially, leaving a deep lateral
        # costophrenic angle.
        dome_cx = self.cx - side * 0.04
        dome_r = _ellipse_r(
            x, y, dome_cx, self.cy + self.ay * 1.02, self.ax * 0.95, self.ay * rng.uniform(0.26, 0.36)
        )
        self.mask = _soft_inside(self.r, edge * 2.5) * (1.0 - _soft_inside(dome_r, edge * 2.0))
        # Outward = towards the chest wall, which is where covid haze sits.
        self.outward = self.u * side

    def to_xy(self, u: float, v: float) -> tuple[float, float]:
        """Image coordinates of a point given in this lung's local coordinates."""
        width = float(_lung_width(np.asarray(v)))
        lu, lv = u * width * self.ax, v * self.ay
        ca, sa = np.cos(self.angle), np.sin(self.angle)
        return self.cx + lu * ca - lv * sa, self.cy + lu * sa + lv * ca


def _anatomy(
    x: np.ndarray, y: np.ndarray, rng: np.random.Generator, edge: float
) -> tuple[np.ndarray, tuple[_Lung, _Lung]]:
    """Density map of a healthy thorax (brighter = denser) and its two lungs."""
    size = x.shape[0]
    body_w = rng.uniform(0.88, 0.98)
    # Superellipse thorax: square-ish shoulders, rounded flanks; neck on top.
    tx_, ty_ = np.abs(x / body_w), np.abs((y - 0.12) / 1.02)
    thorax = tx_ * tx_ * tx_ + ty_ * ty_ * ty_
    body = np.maximum(
        _sigmoid((1.0 - thorax) / (edge * 4)),
        _soft_inside(_ellipse_r(x, y, 0.0, -1.0, 0.27, 0.3), edge * 3),
    )
    density = 0.04 + rng.uniform(0.44, 0.52) * body

    # Heart shadow: bulges towards the image right (patient's left) and hides
    # the medial lower lung behind it.
    heart = _soft_inside(
        _ellipse_r(
            x, y, rng.uniform(0.08, 0.14), rng.uniform(0.30, 0.38),
            rng.uniform(0.30, 0.36), rng.uniform(0.22, 0.27), rng.uniform(-0.45, -0.25),
        ),
        edge * 5,
    )
    density += 0.04 * heart * body

    lungs = (_Lung(x, y, -1, rng, edge), _Lung(x, y, +1, rng, edge))
    lung_mask = np.maximum(lungs[0].mask, lungs[1].mask)
    # Aerated lung: dark, a little denser towards the bases and the hila.
    lung_depth = rng.uniform(0.26, 0.32)
    # One vessel field serves both lungs: they never overlap.
    ridges = np.exp(-(_smooth_noise(rng, size, 0.012) ** 2) * 3.0)
    for lung in lungs:
        visible = lung.mask * (1.0 - 0.85 * heart)
        shade = 1.0 - 0.12 * _smoothstep(-0.2, 1.0, lung.v) - 0.12 * _smoothstep(-0.2, 1.0, -lung.outward)
        density -= lung_depth * shade * visible
        # Hilum and vascular markings: branching-looking ridges that fade
        # towards the periphery.
        hx, hy = lung.to_xy(-lung.side * 0.75, -0.05)
        hilum = np.exp(-0.5 * ((x - hx) ** 2 + (y - hy) ** 2) / 0.09**2)
        vessels = ridges * (0.35 + 0.65 * _smoothstep(0.9, -0.6, lung.outward))
        density += (0.07 * hilum + 0.035 * vessels) * visible

    _add_bones(density, x, y, rng, body, lung_mask, heart)
    return density, lungs


def _add_bones(
    density: np.ndarray, x: np.ndarray, y: np.ndarray, rng: np.random.Generator,
    body: np.ndarray, lung_mask: np.ndarray, heart: np.ndarray,
) -> None:
    """Mediastinum, spine, ribs and clavicles, added to ``density`` in place."""
    size = x.shape[0]
    # Mediastinum and spine: a bright central column, vertebrae as a faint
    # periodic texture behind it.
    xs = x - rng.uniform(-0.02, 0.02)
    m_ = (xs / (0.10 + 0.04 * _smoothstep(-0.6, 0.2, y))) ** 2
    mediastinum = np.exp(-0.5 * m_ * m_)
    spine = np.exp(-0.5 * (xs / 0.05) ** 2)
    vertebrae = 0.7 + 0.3 * np.cos(np.pi * (y - rng.uniform(0, 1)) / 0.12) ** 2
    density += (0.08 * mediastinum + 0.08 * spine * vertebrae) * body

    # Posterior ribs: arcs rising slightly from the spine then sweeping down
    # laterally, visible mostly over the dark lungs.
    ax_ = np.abs(x)
    spacing = 0.125 * rng.uniform(0.93, 1.07)
    first = -0.70 + rng.uniform(-0.03, 0.03)
    curve = rng.uniform(0.75, 0.95)
    # Rib k runs along y = first + k * spacing + shape(x); the distance to the
    # nearest of 11 ribs is cheaper than drawing each one.
    k = np.clip(np.rint((y - first + 0.30 * ax_ - curve * ax_ * ax_) / spacing), 0, 10)
    rib_dy = y - (first + k * spacing - 0.30 * ax_ + curve * ax_ * ax_)
    rib_w = max(0.018, 2.4 / size)  # at least ~1.2 px at small sizes
    ribs = np.exp(-0.5 * (rib_dy / rib_w) ** 2)
    ribs *= _smoothstep(0.05, 0.12, ax_) * (1.0 - _smoothstep(0.82, 0.95, ax_))
    density += rng.uniform(0.04, 0.065) * ribs * body * (0.2 + 0.8 * lung_mask * (1.0 - 0.8 * heart))

    # Clavicles: bright bars from the sternal notch out towards the shoulders.
    clav_y = -0.64 + rng.uniform(-0.03, 0.03) - 0.28 * (ax_ - 0.1) + 0.25 * (ax_ - 0.1) ** 2
    clav = np.exp(-0.5 * ((y - clav_y) / max(0.025, 2.4 / size)) ** 2)
    clav *= _smoothstep(0.05, 0.12, ax_) * (1.0 - _smoothstep(0.6, 0.75, ax_))
    density += 0.12 * clav * body


def _pneumonia(
    x: np.ndarray, y: np.ndarray, lungs: tuple[_Lung, _Lung], rng: np.random.Generator
) -> np.ndarray:
    """Lobar consolidation: blotchy opacities in one lung, mostly the lower zone."""
    size = x.shape[0]
    lung = lungs[int(rng.integers(2))]
    n_patches = 1 + int(rng.binomial(2, 0.3))
    blobs = np.zeros_like(x)
    for _ in range(n_patches):
        if rng.random() < 0.75:
            v = rng.uniform(0.1, 0.75)
        else:
            v = rng.uniform(-0.6, 0.1)
        cx, cy = lung.to_xy(rng.uniform(-0.55, 0.55), v)
        radius = rng.uniform(0.11, 0.20)
        blobs = np.maximum(blobs, np.exp(-0.5 * ((x - cx) ** 2 + (y - cy) ** 2) / radius**2))
    # Solid core with a mottled, irregular margin: threshold smoothed noise
    # against the blob profile so the outline is ragged, not round.
    mottle = _smooth_noise(rng, size, 0.06)
    opacity = _sigmoid((blobs - 0.45 + 0.22 * mottle) / 0.1)
    opacity *= 0.85 + 0.15 * np.tanh(_smooth_noise(rng, size, 0.025))
    return rng.uniform(0.15, 0.34) * opacity * lung.mask


def _covid(
    x: np.ndarray, y: np.ndarray, lungs: tuple[_Lung, _Lung], rng: np.random.Generator
) -> np.ndarray:
    """Ground glass: faint bilateral haze hugging the chest wall, worse at the bases."""
    size = x.shape[0]
    patchiness = 0.55 + 0.45 * _sigmoid(_smooth_noise(rng, size, 0.06) * 1.5)
    base = rng.uniform(0.14, 0.27)
    haze = np.zeros_like(x)
    for lung in lungs:
        peripheral = _smoothstep(0.15, 0.85, lung.r)
        lateral = _sigmoid(lung.outward * 4.0 + 1.0)
        lower = 0.3 + 0.7 * _smoothstep(-0.6, 0.7, lung.v)
        haze += base * rng.uniform(0.75, 1.25) * peripheral * lateral * lower * lung.mask
    return haze * patchiness


def render_phantom(label: str, index: int, size: int = 128, seed: int = 0) -> np.ndarray:
    """One phantom as a (size, size) uint8 array, reproducible from its arguments alone."""
    if label not in DEMO_CLASSES:
        raise ConfigError(f"unknown demo class {label!r}; expected one of {', '.join(DEMO_CLASSES)}")
    if size < _MIN_SIZE:
        raise ConfigError(f"demo image size must be at least {_MIN_SIZE}, got {size}")
    if index < 0 or seed < 0:
        raise ConfigError(f"demo index and seed must be non-negative, got index={index}, seed={seed}")
    # A tuple seeds an independent stream per image: no image depends on how
    # many were asked for, and seed s never reuses the images of seed s + 1.
    rng = np.random.default_rng((seed, DEMO_CLASSES.index(label), index))

    x0, y0 = _grid(size)
    # Patient positioning: small shift, rotation and magnification.
    ang = np.deg2rad(rng.uniform(-4.0, 4.0))
    scale = rng.uniform(0.94, 1.06)
    tx, ty = rng.uniform(-0.04, 0.04, 2)
    x = ((x0 - tx) * np.cos(ang) + (y0 - ty) * np.sin(ang)) / scale
    y = (-(x0 - tx) * np.sin(ang) + (y0 - ty) * np.cos(ang)) / scale
    edge = 3.0 / size  # soft edges a pixel or two wide at any size

    density, lungs = _anatomy(x, y, rng, edge)
    if label == "pneumonia":
        density += _pneumonia(x, y, lungs, rng)
    elif label == "covid":
        density += _covid(x, y, lungs, rng)

    # Film: slow non-uniformity, fine mottle and grain, then a random exposure.
    density += 0.035 * _smooth_noise(rng, size, 0.3)
    density += 0.012 * _smooth_noise(rng, size, 0.02)
    density += rng.normal(0.0, rng.uniform(0.008, 0.02), density.shape)
    contrast = rng.uniform(0.85, 1.2)
    offset = rng.uniform(-0.05, 0.06)
    gamma = rng.uniform(0.8, 1.2)
    img = np.clip(offset + contrast * density, 0.0, 1.0) ** gamma
    return np.round(img * 255.0).astype(np.uint8)


def nominal_lung_mask(size: int = 128) -> np.ndarray:
    """Boolean core of the lung fields that every phantom's lungs cover.

    For sanity checks that compare classes from the pixels alone: the nominal
    lungs shrunk enough to stay inside the lungs despite per-image jitter.
    """
    x, y = _grid(size)
    mask = np.zeros((size, size), dtype=bool)
    for side in (-1, 1):
        r = _ellipse_r(x, y, side * _LUNG_CX, _LUNG_CY + 0.05, _LUNG_AX * 0.6, _LUNG_AY * 0.6)
        mask |= r < 1.0
    return mask


def _png_bytes(pixels: np.ndarray) -> bytes:
    """Encode as 8-bit grayscale PNG with no metadata, so bytes depend on pixels only."""
    buf = io.BytesIO()
    image = Image.fromarray(pixels)  # uint8 2-D -> mode "L"
    image.save(buf, format="PNG")
    return buf.getvalue()


def _readme(images_per_class: int, size: int, seed: int) -> str:
    """Provenance note shipped with the images; no timestamp, so reruns stay byte-identical."""
    counts = "\n".join(f"  {c}: {images_per_class}" for c in DEMO_CLASSES)
    return (
        "SYNTHETIC DATA - chest-radiograph phantoms for demos and tests only.\n"
        "\n"
        "These images were drawn by a program; none comes from a patient and\n"
        "none is a medical image. A model trained on them learns the generator,\n"
        "not radiology. Do not use them, or models trained on them, for any\n"
        "clinical purpose.\n"
        "\n"
        f"generator: {__name__}.generate_demo_dataset\n"
        f"seed: {seed}\n"
        f"size: {size}x{size} pixels, 8-bit grayscale PNG\n"
        f"images per class: {images_per_class}\n"
        "counts:\n"
        f"{counts}\n"
        "\n"
        "classes:\n"
        "  normal: clear lungs\n"
        "  pneumonia: patchy consolidation in one lung, mostly the lower zone\n"
        "  covid: bilateral peripheral ground-glass haze, worse at the bases\n"
    )


def _write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file so an interrupted run never leaves a truncated image."""
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _same_bytes(path: Path, data: bytes) -> bool:
    """Compare without trusting names or timestamps: only identical bytes count as ours."""
    try:
        return path.stat().st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False


def generate_demo_dataset(
    out_dir: Path, images_per_class: int = 100, size: int = 128, seed: int = 0
) -> dict[str, int]:
    """Write the synthetic demo dataset as ``out_dir/<class>/<class>_<NNNN>.png``.

    Refuses to touch a non-empty ``out_dir`` unless it already holds exactly
    this dataset (same arguments, identical bytes), in which case it is a
    no-op; so re-running ``make demo`` is safe and never overwrites real data.
    Returns the number of images per class.
    """
    out_dir = Path(out_dir)
    if isinstance(images_per_class, bool) or not isinstance(images_per_class, int) or images_per_class < 1:
        raise ConfigError(f"images_per_class must be a positive integer, got {images_per_class!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < _MIN_SIZE:
        raise ConfigError(f"demo image size must be an integer of at least {_MIN_SIZE}, got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"demo seed must be a non-negative integer, got {seed!r}")
    if images_per_class > 9999:
        raise ConfigError(f"images_per_class must be at most 9999, got {images_per_class}")
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"demo dataset path {out_dir} exists and is not a directory")

    readme = _readme(images_per_class, size, seed).encode("utf-8")
    files = {out_dir / _README: None} | {
        out_dir / c / f"{c}_{i:04d}.png": (c, i) for c in DEMO_CLASSES for i in range(images_per_class)
    }

    # Temporary files an interrupted run of ours left behind (see _write_atomic).
    leftovers = {p.with_name(f".{p.name}.partial") for p in files}
    existing = [p for p in out_dir.rglob("*") if p not in leftovers] if out_dir.is_dir() else []
    if existing:
        # Only an earlier (possibly interrupted) run of this very dataset may be
        # continued; anything else could be someone's real data.
        present = _check_ours(out_dir, existing, files, readme, size, seed)
        if len(present) == len(files):
            logger.info("demo dataset already present and identical in %s; nothing to do", out_dir)
            return {c: images_per_class for c in DEMO_CLASSES}
        logger.info("completing an interrupted demo dataset in %s (%d of %d files present)",
                    out_dir, len(present), len(files))
    else:
        present = set()

    for c in DEMO_CLASSES:
        (out_dir / c).mkdir(parents=True, exist_ok=True)
    for tmp in leftovers:
        tmp.unlink(missing_ok=True)
    for path, key in files.items():
        if key is None or path in present:
            continue
        _write_atomic(path, _png_bytes(render_phantom(key[0], key[1], size, seed)))
    # README last: its presence marks a complete dataset.
    _write_atomic(out_dir / _README, readme)
    logger.info(
        "wrote synthetic demo dataset: %d images per class x %d classes, %dx%d px, seed %d, to %s",
        images_per_class, len(DEMO_CLASSES), size, size, seed, out_dir,
    )
    return {c: images_per_class for c in DEMO_CLASSES}


def _check_ours(
    out_dir: Path,
    existing: list[Path],
    files: dict[Path, tuple[str, int] | None],
    readme: bytes,
    size: int,
    seed: int,
) -> set[Path]:
    """Files of this dataset already in ``out_dir``; DataError if anything else is there.

    Every existing file must be one we would write, with identical bytes.
    """
    refusal = DataError(
        f"demo dataset directory {out_dir} already exists and is not empty, and it is not "
        f"this demo dataset (seed={seed}, size={size}, {len(files) - 1} images); "
        "choose another directory or remove it"
    )
    class_dirs = {out_dir / c for c in DEMO_CLASSES}
    present = {p for p in existing if not (p in class_dirs and p.is_dir())}
    if not present <= files.keys():
        raise refusal
    for path in present:
        key = files[path]
        expected = readme if key is None else _png_bytes(render_phantom(key[0], key[1], size, seed))
        if not _same_bytes(path, expected):
            raise refusal
    return present
