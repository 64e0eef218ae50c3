"""Encoding and decoding of images and masks as bytes, with Pillow and numpy only.

Packing and prediction use these; they import neither torch nor torchvision, so the
packer starts fast and forks cleanly into worker processes. Shards are read back (for
training, evaluation and ``shards verify``) by :func:`unetseg.stream.decode_pair`;
:func:`decode_image` and :func:`decode_mask` are the same reading through Pillow, which
the tests hold ``decode_pair`` to.

Shards store images as JPEG or PNG (the two formats both Pillow and ``torchvision.io``
decode) and masks as 8-bit single-channel PNGs of class ids.

Only 8-bit files are read (:func:`open_fully` refuses others with :class:`BitDepthError`):
Pillow clips 16-bit grayscale to white when it converts to RGB and reads 16-bit colour
as 8-bit, while ``torchvision.io`` decodes the same PNG as uint16, so one file would give
three different images. Support for 16 bits end to end is issue 26.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# Image formats packed as they are; the other 8-bit ones are converted to 8-bit RGB PNGs
# (alpha dropped, grayscale and palette expanded).
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png"}
KEPT_MODES = {"RGB", "L"}
IMAGE_DEPTH_FIX = ("convert it to 8 bits per channel first, scaling its values to 0..255 as suits the data "
                   "(e.g. `magick IN -depth 8 OUT.png`); 16-bit images are not supported yet (issue 26)")
MASK_DEPTH_FIX = ("save it as an 8-bit PNG holding the class ids unchanged (not rescaled); "
                  "class ids are 0..255")


class DecodeError(ValueError):
    """Bytes that Pillow cannot decode completely (unreadable or truncated)."""


class BitDepthError(DecodeError):
    """An image of more than 8 bits per channel (16-bit PNG or TIFF, 32-bit integer or
    float), which unetseg does not read yet; the message says what the file holds."""


def _mode_depth(mode: str) -> str | None:
    """What a Pillow mode of values wider than 8 bits holds, or ``None``."""
    if mode.startswith("I;16"):
        return f"16 bits per channel (Pillow mode {mode})"
    if mode == "I":
        return "integers of more than 8 bits (Pillow mode I)"
    if mode == "F":
        return "floating-point values (Pillow mode F)"
    return None


def wide_depth(img: Image.Image, data: bytes) -> str | None:
    """What makes an opened (not yet loaded) image more than 8 bits per channel, or
    ``None`` for an 8-bit one. The file's header decides for PNG and TIFF, because Pillow
    opens a 16-bit colour PNG or TIFF as 8-bit RGB(A) and only the header still says so."""
    if (wide := _mode_depth(img.mode)) is not None:
        return wide
    if img.format == "PNG" and data[12:16] == b"IHDR" and data[24] > 8:  # IHDR's bit depth byte
        return f"{data[24]} bits per channel (a {data[24]}-bit PNG, read by Pillow as mode {img.mode})"
    if img.format == "TIFF":
        bits = img.tag_v2.get(258, 1)  # BitsPerSample: one value per channel
        bits = tuple(bits) if isinstance(bits, (tuple, list)) else (bits,)
        if max(bits) > 8:
            return f"{max(bits)} bits per channel (a TIFF of BitsPerSample {bits}, read by Pillow as mode {img.mode})"
    return None


def open_fully(data: bytes) -> Image.Image:
    """Open and fully decode ``data``; a truncated file raises :class:`DecodeError`, an image
    of more than 8 bits per channel :class:`BitDepthError` (before its pixels are decoded)."""
    try:
        img = Image.open(io.BytesIO(data))
        wide = wide_depth(img, data)
        if wide is None:
            img.load()  # decodes every pixel: a truncated file fails here, not later
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ValueError...)
        raise DecodeError(f"{type(e).__name__}: {e}") from None
    if wide is not None:
        raise BitDepthError(wide)
    return img


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """HxWx3 uint8 RGB; alpha is dropped, grayscale and palette images are expanded. An
    image of wider values raises :class:`BitDepthError`: Pillow's conversion would clip
    16-bit grayscale to white and 32-bit floats to black."""
    if (wide := _mode_depth(img.mode)) is not None:
        raise BitDepthError(wide)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def _as_uint8(array: np.ndarray) -> np.ndarray:
    """``array`` as contiguous uint8; values outside 0..255 are refused rather than wrapped
    (a class id 256 would read back as 0, a 16-bit pixel as noise)."""
    array = np.asarray(array)
    if array.dtype != np.uint8 and array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"values {array.min()}..{array.max()} do not fit an 8-bit image (0..255)")
    return np.ascontiguousarray(array, dtype=np.uint8)


def encode_png(array: np.ndarray) -> bytes:
    """Lossless PNG of an HxW (L) or HxWx3 (RGB) 8-bit array; same array, same bytes.
    Values outside 0..255 are refused."""
    buf = io.BytesIO()
    Image.fromarray(_as_uint8(array)).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def encode_jpeg(array: np.ndarray, quality: int) -> bytes:
    """JPEG of an HxWx3 8-bit array; values outside 0..255 are refused, as for PNG."""
    buf = io.BytesIO()
    Image.fromarray(_as_uint8(array)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """Decode a stored image to HxWx3 uint8 RGB."""
    return to_rgb_array(open_fully(data))


def decode_mask(data: bytes) -> np.ndarray:
    """Decode a stored mask (8-bit PNG of class ids) to HxW uint8."""
    img = open_fully(data)
    if img.mode not in ("L", "P"):
        raise DecodeError(f"mask mode is {img.mode}, expected an 8-bit single-channel PNG (L)")
    return np.asarray(img, dtype=np.uint8)
