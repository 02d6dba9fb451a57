"""Image decoding and normalisation, shared by transformation, evaluation and serving.

Serving must see pixels exactly as training did, so there is one path from
bytes to model input: decode (any mode, any bit depth) -> 8-bit grayscale ->
square resize -> scale and normalise.

A model trained on pre-shrunk images (MedMNIST's 28 px) also records how those
images were made from full-size films (``source_crop``, ``source_size``,
``source_filter``), so a full-size upload is shrunk the same way before the
model's own resize: MedMNIST v2 centre-cropped each PneumoniaMNIST film to a
square of its short edge, then resized it to 28x28 (MedMNIST's
``on_medmnist_plus.md``). The resize filter is not published; ``bicubic`` (PIL's
antialiased default) is recorded as the best available guess.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from xray.data.dicom import DICOM_SUFFIXES, DicomInfo, DicomUnsupportedError, is_dicom, read_dicom_dataset
from xray.entity.artifact_entity import DataTransformationArtifact
from xray.errors import ImageDecodeError, ImageTooLargeError

# The only decoders an image ever reaches (Pillow format name -> file suffixes): every other Pillow
# plugin stays unreachable from data and uploads (EPS, for one, would run Ghostscript). DICOM is
# recognised by its DICM marker and decoded by pydicom (xray/data/dicom.py), never by Pillow.
IMAGE_FORMATS: dict[str, tuple[str, ...]] = {
    "PNG": (".png",),
    "JPEG": (".jpg", ".jpeg"),
    "TIFF": (".tif", ".tiff"),
}
IMAGE_SUFFIXES = (*(suffix for suffixes in IMAGE_FORMATS.values() for suffix in suffixes), *DICOM_SUFFIXES)
ACCEPTED = ", ".join([*IMAGE_FORMATS, "DICOM"])
DEFAULT_MAX_PIXELS = 50_000_000  # far above any radiograph, far below a decompression bomb
INTENSITY_CHUNK = 256  # films equalised at a time when a whole array is done at once (training's arrays)


class UnsupportedImageFormat(ImageDecodeError):
    """An image in a format outside ``IMAGE_FORMATS``, or a DICOM transfer syntax with no decoder here (HTTP 415)."""


def sniff_format(head: bytes) -> str | None:
    """The Pillow format whose signature ``head`` carries, by prefix only: no plugin decodes anything."""
    Image.init()
    for name, (_, accept) in Image.OPEN.items():
        try:
            if accept is not None and accept(head):
                return name
        except Exception:  # noqa: BLE001 - a signature check that trips over short input has no match
            continue
    return None


def _unreadable(data: bytes | Path) -> ImageDecodeError:
    """Refused by every allowed decoder: 415 if it is another image format, else 400."""
    try:
        if isinstance(data, bytes):
            head = data[:64]
        else:
            with data.open("rb") as handle:
                head = handle.read(64)
    except OSError:
        head = b""
    other = sniff_format(head)
    if other is not None and other not in IMAGE_FORMATS:
        return UnsupportedImageFormat(f"{other} images are not accepted: send {ACCEPTED}")
    return ImageDecodeError(f"not a readable image: not a {ACCEPTED} file (or damaged beyond its header)")


@dataclass(frozen=True)
class Preprocessing:
    """What a model expects; saved with every model so serving repeats it exactly."""

    image_size: int
    mean: float
    std: float
    channels: int = 1  # radiographs are grayscale; colour inputs are converted
    source_crop: str = "none"  # none | center_square: how the training images were cut from full-size films
    source_size: int = 0  # > 0: the training images were made at this size first (MedMNIST: 28)
    source_filter: str = "bilinear"  # the filter that made them: bilinear | bicubic | box
    intensity: str = "none"  # none | equalize (see ``equalize``)

    def to_unit(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 ``N×H×W`` -> float ``N×1×H×W`` in [0, 1] (augmentation works here).

        Training, evaluation and every serving runtime pass through here, so the intensity step
        cannot differ between them.
        """
        x = self.intensity_applied(torch.as_tensor(batch))
        return x.unsqueeze(1).float().div_(255.0)

    def intensity_applied(self, batch: np.ndarray | torch.Tensor) -> Any:
        """uint8 ``N×H×W`` with the intensity step done (the same type back: training caches it as arrays).

        An array is done in chunks: torchvision's equalize works in int64, eight times the films' bytes.
        """
        if self.intensity == "none":
            return batch
        if isinstance(batch, torch.Tensor):
            return equalize(batch)
        out = np.empty_like(batch)
        for start in range(0, len(batch), INTENSITY_CHUNK):
            out[start : start + INTENSITY_CHUNK] = equalize(batch[start : start + INTENSITY_CHUNK]).numpy()
        return out

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def to_tensor(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 ``N×H×W`` -> the normalised float ``N×1×H×W`` a model takes."""
        return self.to_unit(batch).sub_(self.mean).div_(self.std)


def equalize(batch: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``N×H×W`` films, each with its grey histogram equalised (torchvision's ``equalize``).

    Why: sources differ in exposure, tone curve and windowing (a scanner's look), which a model can
    learn instead of the lungs; equalising every film maps each onto the same flat histogram.
    """
    from torchvision.transforms.v2.functional import equalize as tv_equalize

    x = torch.as_tensor(batch)
    return tv_equalize(x.unsqueeze(1)).squeeze(1) if len(x) else x


def preprocessing_of(transformation: DataTransformationArtifact, image_size: int = 0) -> Preprocessing:
    """The preprocessing contract of models trained on these arrays.

    ``image_size``: the size the models were trained at when the time budget shrank it (0: the artifact's).
    Here, not on the record: the artifact is a plain record below every stage, and this builds a torch-side object.
    """
    return Preprocessing(
        image_size=image_size or transformation.image_size,
        mean=transformation.normalization["mean"],
        std=transformation.normalization["std"],
        channels=transformation.channels,
        source_crop=transformation.source_crop,
        source_size=transformation.source_size,
        source_filter=transformation.source_filter,
        intensity=transformation.intensity,
    )


def open_image(
    data: bytes | Path, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None, keep_size: bool = False
) -> Image.Image:
    """Decode fully (truncated files fail here, not later), refusing oversize images first.

    ``draft_size`` lets JPEG decode at a reduced scale (1/2 to 1/8, in the
    DCT, still at least ``draft_size`` on each side) and only its luma
    channel, which is far faster for multi-megapixel films that end up at a
    few hundred grey pixels anyway;
    ``keep_size`` records the stored size in ``image.info["xray_original_size"]``.
    """
    try:
        image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data, formats=tuple(IMAGE_FORMATS))
        width, height = image.size
        if width * height > max_pixels:
            raise ImageTooLargeError(f"image is {width}x{height} pixels, above the limit of {max_pixels}")
        if keep_size:
            image.info["xray_original_size"] = (width, height)
        if draft_size is not None and image.format == "JPEG":
            # YCbCr keeps the chroma for the colour check; its Y band is exactly the luma an "L" draft gives
            image.draft("YCbCr" if image.mode == "RGB" else "L", (draft_size, draft_size))
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"image has more pixels than allowed ({exc})") from None
    except UnidentifiedImageError:
        raise _unreadable(data) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"damaged image: {exc}") from None
    return image


_GREYABLE_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")


def to_grayscale_array(image: Image.Image) -> np.ndarray:
    """Any grey or colour PIL mode (L, RGB, RGBA, P, CMYK, 16-bit, float) -> uint8 ``H×W``;
    UnsupportedImageFormat for modes that hold no plain brightness (LAB, HSV)."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float32)  # float32: a 50 MP film stays at 200 MB
        if mode == "F" or mode == "I":
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        else:
            arr = arr * np.float32(255.0 / 65535.0)
        return np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    if mode not in _GREYABLE_MODES:  # TIFF allows LAB, HSV and more: not what a radiograph is stored as
        raise UnsupportedImageFormat(f"images in colour mode {mode} are not accepted: send grey, RGB or palette images")
    if image.mode != "L":
        image = image.convert("L")
    return np.asarray(image, dtype=np.uint8)


def resize_square(pixels: np.ndarray, size: int) -> np.ndarray:
    """Squash to ``size×size`` with antialiasing, as radiograph pipelines conventionally do."""
    if pixels.shape == (size, size):
        return pixels
    image = Image.fromarray(pixels, mode="L")
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0), dtype=np.uint8)


@dataclass(frozen=True)
class DecodedImage:
    """One decode's results: the grey film every model sees, and what the input checks need besides it."""

    grey: np.ndarray  # uint8 H×W at stored size (or JPEG draft size)
    raw: Image.Image | np.ndarray  # before grey conversion: the PIL image, or a DICOM's stored pixels
    dicom: DicomInfo | None = None
    dataset: Any = None  # the pydicom Dataset of a DICOM file, else None


def decode_image(data: bytes | Path, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None) -> DecodedImage:
    """The one decode function: bytes or a file (PNG, JPEG, TIFF or DICOM) -> grey ``H×W`` at stored size.

    DICOM is recognised by its ``DICM`` marker, not its name, so an upload
    without a ``.dcm`` filename decodes the same way as the ingested file.
    """
    if is_dicom(data):
        try:
            read = read_dicom_dataset(data, max_pixels)
        except ImageDecodeError:
            raise
        except DicomUnsupportedError as exc:
            raise UnsupportedImageFormat(str(exc)) from None
        except ValueError as exc:
            raise ImageDecodeError(str(exc)) from None
        return DecodedImage(grey=read.pixels, raw=read.stored, dicom=read.info, dataset=read.dataset)
    image = open_image(data, max_pixels=max_pixels, draft_size=draft_size)
    return DecodedImage(grey=to_grayscale_array(image), raw=image)


def decode_grayscale(
    data: bytes | Path, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None
) -> tuple[np.ndarray, DicomInfo | None]:
    """``decode_image``'s grey film and DICOM attributes (callers that run no input checks)."""
    decoded = decode_image(data, max_pixels, draft_size)
    return decoded.grey, decoded.dicom


AUTO_SMALL, AUTO_LARGE = 32, 128  # image_size "auto" keeps the native size between these


def resolve_image_size(setting: int | str, median_side: int) -> int:
    """``auto``: the native size, kept between 32 px (DenseNet downsamples 32x; MedMNIST's 28 px
    goes to 32, where both candidates beat 64 px on PneumoniaMNIST's validation AUC in a quarter
    of the CPU time, because the same minutes buy 2.5x the epochs) and 128 px (full-size films:
    consolidations stay several pixels wide while DenseNet on two CPU cores trains ~3x faster
    than at 224)."""
    if setting != "auto":
        return int(setting)
    return max(AUTO_SMALL, min(AUTO_LARGE, median_side // 32 * 32))


def resize_batch(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``N×H×W`` -> ``N×size×size``, image by image through ``resize_square``."""
    if pixels.shape[1:] == (size, size):
        return pixels
    return np.stack([resize_square(image, size) for image in pixels]) if len(pixels) else np.empty((0, size, size), np.uint8)


_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
}
SOURCE_CROPS = ("none", "center_square")
SOURCE_FILTERS = tuple(_FILTERS)


def center_square(pixels: np.ndarray) -> np.ndarray:
    """The centred square whose side is the short edge."""
    height, width = pixels.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return pixels[top : top + side, left : left + side]


def fit_to_contract(pixels: np.ndarray, size: int, contract: Preprocessing | None = None) -> np.ndarray:
    """A decoded grey film -> the uint8 ``size×size`` array a model sees.

    With a ``contract`` that records a source size, the film is first made the
    way the training images were (crop, then the source filter to the source
    size), then resized to ``size`` as training resized them.
    """
    source_size = contract.source_size if contract is not None else 0
    if contract is not None and contract.source_crop == "center_square":
        pixels = center_square(pixels)
    if source_size and pixels.shape != (source_size, source_size):
        shrunk = Image.fromarray(np.ascontiguousarray(pixels), mode="L").resize(
            (source_size, source_size), _FILTERS[contract.source_filter]
        )
        pixels = np.asarray(shrunk, dtype=np.uint8)
    return resize_square(pixels, size)


def load_pixels(
    data: bytes | Path, size: int, max_pixels: int = DEFAULT_MAX_PIXELS, contract: Preprocessing | None = None
) -> np.ndarray:
    """Bytes or a file (PNG, JPEG, TIFF or DICOM) -> the uint8 ``size×size`` array a model sees."""
    source_size = contract.source_size if contract is not None else 0
    pixels, _ = decode_grayscale(data, max_pixels=max_pixels, draft_size=source_size or size)
    return fit_to_contract(pixels, size, contract)


def load_for_model(data: bytes | Path, contract: Preprocessing, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Serving's and the external check's path: the model's whole contract, at its input size."""
    return load_pixels(data, contract.image_size, max_pixels, contract)

