"""Decoding one image file to uint8 pixels, the way every imported collection is decoded.

    pixels, kind = decode(path, data)   # (H, W) or (H, W, 3) uint8; kind "gray" or "color"

Formats: PNG, JPEG, TIFF, BMP through Pillow; DICOM through pydicom (the `dicom` extra).

Rules (recorded in every dataset card as RULES):
- 8-bit grayscale (Pillow L, DICOM 8-bit) is kept as it is; RGB as it is; palette images are
  expanded; an alpha channel is dropped; 1-bit images become 0/255.
- More than 8 bits (16-bit PNG/TIFF, 12/16-bit DICOM): the full range the pixel format can hold
  maps linearly onto 0..255 (v * 255 / (2^bits - 1), rounded), so intensities stay comparable
  across images (no per-image stretching).
- DICOM grayscale: the modality LUT (RescaleSlope/Intercept or a Modality LUT) is applied, then
  the VOI LUT or the first window (WindowCenter/Width) if the file has one (pydicom's
  apply_voi_lut); the output range those define (pydicom's: the stored bit depth through the
  modality rescale, or the VOI LUT's bit depth) maps linearly onto 0..255; MONOCHROME1 is
  inverted so that 255 is always bright. Colour DICOM (RGB, YBR_*) is converted to RGB.
- DICOM with no VOI LUT and no window (DICOM_DEFAULT): a CT maps the fixed HU range
  CT_HU_RANGE (-1024..3071, air to dense bone) onto 0..255 (its stored bits' range, e.g. the
  whole int16 range, would leave it nearly flat); any other modality its stored bits' range.
- `window=(center, width)` (`medfm import --window C,W`) replaces every grayscale DICOM's own
  VOI: center - width/2 .. center + width/2 of the modality LUT's output maps onto 0..255.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medfm.errors import MedfmError
from medfm.limits import IMAGE_PIXELS_MAX

PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom")
DICOM_MAGIC_OFFSET = 128  # "DICM" follows a 128-byte preamble in a DICOM Part 10 file

RULES = {
    "bit_depth": "more than 8 bits: the format's full range maps linearly onto 0..255 "
                 "(v * 255 / (2^bits - 1), rounded); no per-image stretching",
    "dicom": "modality LUT, then VOI LUT or first window if present (pydicom apply_voi_lut); "
             "that output range maps linearly onto 0..255; MONOCHROME1 inverted",
    "color": "palette expanded, alpha dropped, 1-bit -> 0/255",
}
CT_HU_RANGE = (-1024.0, 3071.0)  # Hounsfield units a CT without a window maps onto 0..255
DICOM_DEFAULT = ("DICOM without VOI LUT or window: CT maps HU -1024..3071 onto 0..255, other "
                 "modalities their stored bits' range")  # recorded in cards of DICOM imports


@dataclass(frozen=True)
class Decoded:
    """One decoded image."""

    pixels: np.ndarray  # (H, W) or (H, W, 3) uint8
    kind: str  # "gray" or "color"
    default_window: bool = False  # a CT DICOM without a window, mapped through CT_HU_RANGE


class ImageReadError(Exception):
    """An image file that cannot be decoded (its message says why; the path is added later)."""


def is_dicom(path: Path, head: bytes) -> bool:
    """DICOM by suffix, or by the "DICM" magic after the preamble (DICOM often has no suffix)."""
    return (path.suffix.lower() in DICOM_SUFFIXES
            or head[DICOM_MAGIC_OFFSET:DICOM_MAGIC_OFFSET + 4] == b"DICM")


def supported(path: Path, head: bytes) -> bool:
    return path.suffix.lower() in PIL_SUFFIXES or is_dicom(path, head)


def decode(path: Path, data: bytes, *, window: tuple[float, float] | None = None) -> Decoded:
    """The image in `data`; `window` (center, width) for grayscale DICOM (module docstring)."""
    if is_dicom(path, data):
        return _decode_dicom(data, window)
    if path.suffix.lower() not in PIL_SUFFIXES:
        raise ImageReadError(f"unsupported format {path.suffix or '(no suffix)'}: use PNG, "
                             "JPEG, TIFF, BMP or DICOM")
    return Decoded(*_decode_pil(data))


def _scale_bits(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map [lo, hi] linearly onto 0..255, rounded and clipped, as uint8."""
    if hi <= lo:
        raise ImageReadError(f"empty intensity range [{lo}, {hi}]")
    scaled = (values.astype(np.float64) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _check_pixels(width: int, height: int) -> None:
    """ImageReadError for an image too large to decode (a decompression bomb or a scan far
    beyond what an import resizes to 224 px), from its header, before any pixel is decoded."""
    if width * height > IMAGE_PIXELS_MAX:
        raise ImageReadError(
            f"{width} x {height} = {width * height:,} pixels, above medfm's limit of "
            f"{IMAGE_PIXELS_MAX:,} pixels per image (Pillow's decompression-bomb bound); "
            "downscale it first")


def open_image(source):
    """Pillow's Image.open (the header only), without its warning for images between 1x and 2x
    its decompression-bomb bound: medfm refuses those itself (`_check_pixels`)."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(source)


def _decode_pil(data: bytes) -> tuple[np.ndarray, str]:
    from PIL import Image, UnidentifiedImageError

    try:
        image = open_image(io.BytesIO(data))
    except Image.DecompressionBombError:
        image = None  # above 2x Pillow's bound: Pillow refuses before it names the size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(f"not a readable image ({exc})") from None
    if image is None:
        raise ImageReadError(f"more than {2 * IMAGE_PIXELS_MAX:,} pixels, above medfm's limit "
                             f"of {IMAGE_PIXELS_MAX:,} pixels per image (Pillow's "
                             "decompression-bomb bound); downscale it first")
    _check_pixels(*image.size)
    try:
        with image:
            image.load()
            mode = image.mode
            if mode == "P":
                image = image.convert("RGBA" if "transparency" in image.info else "RGB")
                mode = image.mode
            if mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
                return np.asarray(image.convert("RGB"), dtype=np.uint8), "color"
            if mode in ("L", "LA"):
                return np.asarray(image.getchannel(0), dtype=np.uint8), "gray"
            if mode == "1":
                return np.asarray(image.convert("L"), dtype=np.uint8), "gray"
            if mode.startswith("I;16") or mode == "I":
                values = np.asarray(image)
                bits = 16 if mode.startswith("I;16") or values.max(initial=0) < 65536 else 32
                return _scale_bits(values, 0, 2 ** bits - 1), "gray"
            raise ImageReadError(f"unsupported pixel mode {mode}")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(f"not a readable image ({exc})") from None


def _dicom():
    try:
        import pydicom
    except ImportError:
        raise MedfmError("DICOM files need pydicom: pip install 'medfm[dicom]'") from None
    return pydicom


def _decode_dicom(data: bytes, window: tuple[float, float] | None) -> Decoded:
    pydicom = _dicom()
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, convert_color_space

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        _check_pixels(int(ds.get("Columns", 0)),
                      int(ds.get("Rows", 0)) * int(ds.get("NumberOfFrames", 1) or 1))
        pixels = ds.pixel_array
    except ImageReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom fails in many ways on a bad file
        raise ImageReadError(f"not a readable DICOM image ({type(exc).__name__}: {exc})") from None
    if pixels.ndim == 3 and int(ds.get("SamplesPerPixel", 1)) == 1:
        raise ImageReadError(f"a multi-frame DICOM ({pixels.shape[0]} frames); import 2D "
                             "images, one frame per file")
    if int(ds.get("SamplesPerPixel", 1)) == 3:
        photometric = str(ds.get("PhotometricInterpretation", "RGB"))
        if photometric.startswith("YBR"):
            pixels = convert_color_space(pixels, photometric, "RGB")
        bits = int(ds.get("BitsStored", 8))
        return Decoded(pixels.astype(np.uint8) if bits <= 8 else
                       _scale_bits(pixels, 0, 2 ** bits - 1), "color")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    values = apply_modality_lut(pixels, ds)
    own_voi = bool(ds.get("VOILUTSequence")) or ds.get("WindowCenter") is not None
    default = window is None and not own_voi and str(ds.get("Modality", "")) == "CT"
    if window is not None:
        lo, hi = window[0] - window[1] / 2, window[0] + window[1] / 2
    elif default:
        lo, hi = CT_HU_RANGE
    else:
        values = apply_voi_lut(values, ds)
        lo, hi = _dicom_range(ds)
    gray = _scale_bits(values, lo, hi)
    if photometric == "MONOCHROME1":
        gray = 255 - gray
    return Decoded(gray, "gray", default)


def _dicom_range(ds) -> tuple[float, float]:
    """The intensity range the modality and VOI transforms produce (pydicom's convention)."""
    if ds.get("VOILUTSequence"):
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return 0.0, 2.0 ** bits - 1
    bits = int(ds.get("BitsStored", 8))
    if ds.get("ModalityLUTSequence"):
        bits = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        lo, hi = 0.0, 2.0 ** bits - 1
    elif int(ds.get("PixelRepresentation", 0)) == 0:
        lo, hi = 0.0, 2.0 ** bits - 1
    else:
        lo, hi = -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None and not ds.get("ModalityLUTSequence"):
        lo, hi = lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
    return lo, hi


def to_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    """Gray (H, W) <-> colour (H, W, 3): gray is replicated; colour becomes ITU-R 601 luma
    (Pillow's "L" conversion)."""
    if channels == 3 and pixels.ndim == 2:
        return np.repeat(pixels[:, :, None], 3, axis=2)
    if channels == 1 and pixels.ndim == 3:
        from PIL import Image

        return np.asarray(Image.fromarray(pixels).convert("L"), dtype=np.uint8)
    return pixels


def resize_square(pixels: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop to a square (the longer side trimmed evenly), then resize to size x size
    with Pillow's bicubic filter (antialiased when shrinking); a size x size image is kept
    byte for byte."""
    h, w = pixels.shape[:2]
    if h == w == size:
        return pixels
    from PIL import Image

    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = pixels[top:top + side, left:left + side]
    if side == size:
        return np.ascontiguousarray(square)
    image = Image.fromarray(np.ascontiguousarray(square))
    return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)
