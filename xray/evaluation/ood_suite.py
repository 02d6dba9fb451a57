"""A suite of inputs a chest-film classifier must not label, built only from what installs here.

Every run can score it, offline: the DICOM test files pydicom ships (CT, MR,
ultrasound, nuclear medicine…), the images and data arrays matplotlib ships
(a photograph, logos, a product pack, toolbar icons, an MR slice, terrain
elevations), synthetic noise, flat, gradient and checkerboard images, and
inverted and rotated copies of the validation films given. Each item holds
the bytes a client would upload (synthetic images PNG-encoded), so the same
suite goes through serving's ``/predict`` and through the evaluation path.
Built deterministically from ``seed``: the same arguments give the same bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from xray.data.preprocessing import ImageDecodeError, decode_image
from xray.data.quality import check_decoded, refused
from xray.entity.config_entity import InputGateConfig

logger = logging.getLogger(__name__)

FILM_COPIES = {  # kind -> the copy of a validation film
    "inverted": lambda g: 255 - g,
    "rotated_90": lambda g: np.rot90(g, 1),
    "rotated_180": lambda g: np.rot90(g, 2),
    "rotated_270": lambda g: np.rot90(g, 3),
}
_DICOM_KINDS = {"CT": "dicom_ct", "MR": "dicom_mr"}  # other non-radiograph modalities: dicom_other
_RADIOGRAPHS = ("CR", "DX", "DR")
_MIN_DICOM_SIDE = 32  # pydicom's 16-pixel DICOMDIR thumbnails say little about a model
_PACKAGE_IMAGES = ("grace_hopper.jpg", "logo2.png", "Minduka_Present_Blue_Pack.png")


@dataclass(frozen=True)
class OODItem:
    """One input of the suite, as a client would upload it."""

    kind: str
    name: str
    data: bytes
    filename: str


@dataclass(frozen=True)
class KindScore:
    """What the input checks did with one kind of the suite."""

    kind: str
    inputs: int
    refused: int
    codes: dict[str, int] = field(default_factory=dict)  # finding code (or "undecodable") -> inputs it fired on

    @property
    def refusal_rate(self) -> float:
        return self.refused / self.inputs if self.inputs else 0.0


@dataclass(frozen=True)
class SuiteScore:
    kinds: tuple[KindScore, ...]

    @property
    def inputs(self) -> int:
        return sum(k.inputs for k in self.kinds)

    @property
    def refused(self) -> int:
        return sum(k.refused for k in self.kinds)

    @property
    def refusal_rate(self) -> float:
        return self.refused / self.inputs if self.inputs else 0.0


def build_ood_suite(validation_films: list[np.ndarray | Path | str], size: int, seed: int) -> list[OODItem]:
    """The suite: package files, synthetic images at ``size`` px, and copies of ``validation_films``."""
    rng = np.random.default_rng(seed)
    items = [*dicom_items(), *matplotlib_items(), *noise_items(size, rng), *flat_items(size, rng)]
    items += [*gradient_items(size), *checkerboard_items(size)]
    items += film_copies(validation_films)
    logger.info("OOD suite: %d inputs of %d kinds", len(items), len({i.kind for i in items}))
    return items


def score_input_checks(items: list[OODItem], config: InputGateConfig, min_side: int = 0) -> SuiteScore:
    """Run the input checks on every item, as serving would (one decode); count refusals per kind."""
    per_kind: dict[str, list[tuple[bool, set[str]]]] = {}
    for item in items:
        try:
            findings = check_decoded(decode_image(item.data), config, min_side)
            outcome = (refused(findings), {f.code for f in findings})
        except ImageDecodeError:
            outcome = (True, {"undecodable"})
        per_kind.setdefault(item.kind, []).append(outcome)
    kinds = []
    for kind, outcomes in per_kind.items():
        codes: Counter[str] = Counter()
        for _, fired in outcomes:
            codes.update(fired)
        kinds.append(KindScore(kind=kind, inputs=len(outcomes), refused=sum(r for r, _ in outcomes), codes=dict(sorted(codes.items()))))
    return SuiteScore(kinds=tuple(kinds))


def png_bytes(pixels: np.ndarray) -> bytes:
    """uint8 (grey H×W, or H×W×3) or uint16 grey -> PNG bytes, deterministically."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _synthetic(kind: str, name: str, pixels: np.ndarray) -> OODItem:
    return OODItem(kind=kind, name=name, data=png_bytes(pixels), filename=f"{name}.png")


# ------------------------------------------------------------------ what the packages ship


def dicom_items() -> list[OODItem]:
    """pydicom's own test files that decode to one image of another modality (not CR/DX), once per distinct image."""
    from pydicom import dcmread
    from pydicom.data.data_manager import DATA_ROOT
    from pydicom.errors import InvalidDicomError

    items, seen = [], set()
    for path in sorted((Path(DATA_ROOT) / "test_files").rglob("*.dcm")):
        try:
            modality = str(dcmread(path, stop_before_pixels=True).get("Modality", "") or "").upper()
            grey = decode_image(path).grey
        except (InvalidDicomError, ImageDecodeError, OSError, ValueError, AttributeError, KeyError, TypeError):
            continue  # not an image this pipeline decodes (a report, a structure set, a damaged test file)
        digest = hashlib.sha256(grey.tobytes() + str(grey.shape).encode()).hexdigest()
        if not modality or modality in _RADIOGRAPHS or min(grey.shape) < _MIN_DICOM_SIDE or digest in seen:
            continue
        seen.add(digest)
        kind = _DICOM_KINDS.get(modality, "dicom_other")
        items.append(OODItem(kind=kind, name=f"pydicom {path.name} ({modality})", data=path.read_bytes(), filename=path.name))
    return items


def matplotlib_items() -> list[OODItem]:
    """matplotlib's sample images (photograph, logo, product pack), large toolbar icons, and data arrays as images."""
    import matplotlib

    root = Path(matplotlib.get_data_path())
    sample = root / "sample_data"
    items = [
        OODItem(kind="photo_or_logo", name=f"matplotlib {n}", data=(sample / n).read_bytes(), filename=n)
        for n in _PACKAGE_IMAGES if (sample / n).is_file()
    ]
    items += [
        OODItem(kind="icon", name=f"matplotlib {p.name}", data=p.read_bytes(), filename=p.name)
        for p in sorted((root / "images").glob("*_large.png"))
    ]
    arrays: dict[str, np.ndarray] = {}
    if (sample / "s1045.ima.gz").is_file():  # a 256x256 16-bit MR slice
        arrays["s1045_mr_slice"] = np.frombuffer(gzip.decompress((sample / "s1045.ima.gz").read_bytes()), "<u2").reshape(256, 256)
    for name, key in (("jacksboro_fault_dem", "elevation"), ("topobathy", "topo")):
        if (sample / f"{name}.npz").is_file():
            with np.load(sample / f"{name}.npz") as archive:
                arrays[name] = archive[key]
    items += [_synthetic("scientific_data", f"matplotlib {name}", _to_uint8(values)) for name, values in arrays.items()]
    return items


def _to_uint8(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    lo, hi = float(values.min()), float(values.max())
    return np.zeros(values.shape, np.uint8) if hi <= lo else np.rint((values - lo) / (hi - lo) * 255).astype(np.uint8)


# ------------------------------------------------------------------ synthetic images


def noise_items(size: int, rng: np.random.Generator) -> list[OODItem]:
    """Uniform, Gaussian, salt-and-pepper and smooth (blurred) noise, grey and colour."""
    shape = (size, size)
    small = max(2, size // 16)
    items = [
        _synthetic("noise", "uniform noise", rng.integers(0, 256, shape, dtype=np.uint8)),
        _synthetic("noise", "gaussian noise", np.clip(rng.normal(128, 40, shape), 0, 255).astype(np.uint8)),
        _synthetic("noise", "dark gaussian noise", np.clip(rng.normal(60, 25, shape), 0, 255).astype(np.uint8)),
        _synthetic("noise", "salt and pepper", (rng.random(shape) < 0.5).astype(np.uint8) * 255),
        _synthetic("noise", "colour noise", rng.integers(0, 256, (*shape, 3), dtype=np.uint8)),
    ]
    for index in range(3):
        coarse = rng.integers(0, 256, (small, small), dtype=np.uint8)
        blurred = np.asarray(Image.fromarray(coarse).resize(shape, Image.Resampling.BICUBIC))
        items.append(_synthetic("noise", f"smooth noise {index}", blurred))
    return items


def flat_items(size: int, rng: np.random.Generator) -> list[OODItem]:
    """Flat images: black, white, greys, one with faint noise, one flat colour."""
    items = [_synthetic("flat", f"flat {level}", np.full((size, size), level, np.uint8)) for level in (0, 32, 96, 128, 200, 255)]
    faint = np.clip(128 + rng.normal(0, 1.5, (size, size)), 0, 255).astype(np.uint8)
    items.append(_synthetic("flat", "flat 128 with faint noise", faint))
    items.append(_synthetic("flat", "flat red", np.broadcast_to(np.array([200, 30, 30], np.uint8), (size, size, 3))))
    return items


def gradient_items(size: int) -> list[OODItem]:
    """Horizontal, vertical (both ways), diagonal and radial (both ways) gradients."""
    ramp = np.linspace(0, 255, size)
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    radius = np.sqrt((x - 0.5) ** 2 + (y - 0.5) ** 2) / np.sqrt(0.5)
    arrays = {
        "horizontal gradient": np.tile(ramp, (size, 1)),
        "horizontal gradient reversed": np.tile(ramp[::-1], (size, 1)),
        "vertical gradient": np.tile(ramp[:, None], (1, size)),
        "vertical gradient reversed": np.tile(ramp[::-1, None], (1, size)),
        "diagonal gradient": (x + y) / 2 * 255,
        "radial gradient": radius * 255,
        "radial gradient reversed": (1 - radius) * 255,
    }
    return [_synthetic("gradient", name, np.rint(values).astype(np.uint8)) for name, values in arrays.items()]


def checkerboard_items(size: int) -> list[OODItem]:
    """Black-and-white checkerboards of several square sizes, and one in two greys."""
    y, x = np.mgrid[0:size, 0:size]
    items = []
    for square in (2, 4, 8, 16, max(2, size // 4)):
        board = (((x // square) + (y // square)) % 2 * 255).astype(np.uint8)
        items.append(_synthetic("checkerboard", f"checkerboard {square} px", board))
    grey = np.where(((x // 8) + (y // 8)) % 2 == 1, 150, 90).astype(np.uint8)
    items.append(_synthetic("checkerboard", "grey checkerboard 8 px", grey))
    return items


# ------------------------------------------------------------------ copies of real films


def film_copies(films: list[np.ndarray | Path | str]) -> list[OODItem]:
    """Each film (grey array, or a file decoded as serving decodes it) inverted and rotated by 90, 180 and 270 degrees."""
    items = []
    for index, film in enumerate(films):
        grey = film if isinstance(film, np.ndarray) else decode_image(Path(film)).grey
        label = Path(film).stem if not isinstance(film, np.ndarray) else f"film {index}"
        for kind, copy in FILM_COPIES.items():
            items.append(_synthetic(kind, f"{label} {kind.replace('_', ' ')}", np.ascontiguousarray(copy(grey))))
    return items
