"""unetseg.imageio: lossless PNG round trips, RGB conversion, and DecodeError for bytes that don't decode fully."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from unetseg.imageio import DecodeError, decode_image, decode_mask, encode_jpeg, encode_png, open_fully, to_rgb_array


def saved(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_png_round_trip_is_exact_and_deterministic():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(17, 23, 3), dtype=np.uint8)
    mask = rng.integers(0, 256, size=(17, 23), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(encode_png(image)), image)
    np.testing.assert_array_equal(decode_mask(encode_png(mask)), mask)
    assert encode_png(mask) == encode_png(mask.copy())  # same array, same bytes
    strided = image[:, ::2]  # not contiguous
    np.testing.assert_array_equal(decode_image(encode_png(strided)), strided)


def test_jpeg_decodes_to_rgb_of_the_same_size():
    image = np.full((16, 24, 3), (200, 40, 90), dtype=np.uint8)
    decoded = decode_image(encode_jpeg(image, quality=95))
    assert decoded.shape == image.shape and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - image).max() <= 8


def test_rgb_conversion_expands_grey_and_palette_and_drops_alpha():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    np.testing.assert_array_equal(decode_image(saved(Image.fromarray(grey, "L"))), np.repeat(grey[..., None], 3, axis=2))
    rgba = np.zeros((3, 4, 4), dtype=np.uint8)
    rgba[..., :3], rgba[..., 3] = (10, 20, 30), 0  # fully transparent: colour kept, alpha dropped
    assert decode_image(saved(Image.fromarray(rgba, "RGBA"))).tolist() == [[[10, 20, 30]] * 4] * 3
    pal = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), "P")
    pal.putpalette([5, 6, 7, 250, 251, 252] + [0] * 762)
    assert to_rgb_array(pal).tolist() == [[[5, 6, 7], [250, 251, 252]]]


def test_palette_mask_decodes_to_indices_and_rgb_mask_is_refused():
    ids = np.array([[0, 1, 2], [3, 255, 1]], dtype=np.uint8)
    pal = Image.fromarray(ids, "P")
    pal.putpalette([9, 9, 9] * 256)  # colours must not matter: a P mask holds class ids
    np.testing.assert_array_equal(decode_mask(saved(pal)), ids)
    with pytest.raises(DecodeError, match="mask mode is RGB"):
        decode_mask(encode_png(np.zeros((2, 2, 3), np.uint8)))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_and_garbage_bytes_raise_decode_error(fmt):
    data = saved(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)), fmt)
    open_fully(data)  # the whole file decodes
    for broken in (data[: len(data) // 2], b"not an image at all", b""):
        with pytest.raises(DecodeError):
            decode_image(broken)
        with pytest.raises(DecodeError):
            decode_mask(broken)
    assert issubclass(DecodeError, ValueError)


def test_encode_png_refuses_values_that_would_wrap():
    ids = np.array([[0, 255]], dtype=np.int64)
    np.testing.assert_array_equal(decode_mask(encode_png(ids)), ids)  # 0..255 in a wider type is fine
    with pytest.raises(ValueError, match="0..255"):
        encode_png(np.array([[0, 256]]))
    with pytest.raises(ValueError, match="0..255"):
        encode_png(np.array([[-1, 3]]))


def test_encode_jpeg_refuses_values_that_would_wrap_as_png_does():
    """A 16-bit pixel (40000) would wrap to 64 in a JPEG as it would in a PNG."""
    with pytest.raises(ValueError, match="0..255"):
        encode_jpeg(np.full((4, 4, 3), 40000, np.uint16), quality=95)
    image = np.full((4, 4, 3), 200, np.int64)
    assert np.abs(decode_image(encode_jpeg(image, quality=95)).astype(int) - 200).max() <= 2


def test_wide_images_are_refused_with_what_they_hold():
    """16-bit grayscale converts to white and 32-bit floats to black in Pillow's RGB
    conversion: open_fully and to_rgb_array refuse them and say what they hold."""
    from unetseg.imageio import BitDepthError

    for array, holds in ((np.full((2, 3), 40000, np.uint16), "16 bits per channel (Pillow mode I;16)"),
                         (np.full((2, 3), 0.5, np.float32), "floating-point values (Pillow mode F)")):
        data = saved(Image.fromarray(array), "TIFF")
        with pytest.raises(BitDepthError, match=holds.replace("(", r"\(").replace(")", r"\)")):
            open_fully(data)
        with pytest.raises(BitDepthError, match="Pillow mode"):
            to_rgb_array(Image.fromarray(array))
        with pytest.raises(DecodeError):  # a BitDepthError is a DecodeError: callers that skip those skip these
            decode_image(data)
