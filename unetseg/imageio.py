"""Encoding and decoding of images and masks as bytes, with Pillow and numpy only.

Packing and verification use these; they import neither torch nor torchvision, so the
shard tools start fast and fork cleanly into worker processes.

Shards store images as JPEG or PNG (the two formats both Pillow and ``torchvision.io``
decode) and masks as 8-bit single-channel PNGs of class ids.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# Image formats packed as they are; the others are converted to PNG without loss.
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png"}
KEPT_MODES = {"RGB", "L"}


class DecodeError(ValueError):
    """Bytes that Pillow cannot decode completely (unreadable or truncated)."""


def open_fully(data: bytes) -> Image.Image:
    """Open and fully decode ``data``; a truncated file raises :class:`DecodeError`."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # decodes every pixel: a truncated file fails here, not later
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ValueError...)
        raise DecodeError(f"{type(e).__name__}: {e}") from None
    return img


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """HxWx3 uint8 RGB; alpha is dropped, grayscale and palette images are expanded."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def encode_png(array: np.ndarray) -> bytes:
    """Lossless PNG of an HxW (L) or HxWx3 (RGB) 8-bit array; same array, same bytes.
    Values outside 0..255 are refused rather than wrapped (a class id 256 would read back
    as 0)."""
    array = np.asarray(array)
    if array.dtype != np.uint8 and array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"values {array.min()}..{array.max()} do not fit an 8-bit PNG (0..255)")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def encode_jpeg(array: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(buf, format="JPEG", quality=quality)
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
