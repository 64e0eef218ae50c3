"""Images of more than 8 bits per channel (issue 22, item 2): refused by pack, by the
training decoder, by ``shards verify`` and by predict, each with the file and the fix,
until 16 bits are supported end to end (issue 26); 8-bit modes read alike everywhere."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import leftovers, make, make_folders, replace_image, write_classes
from unetseg.errors import InputProblems
from unetseg.imageio import decode_image, to_rgb_array
from unetseg.pack import pack

H, W = 8, 10


def png16(array: np.ndarray) -> bytes:
    """A 16-bit PNG of an HxW or HxWxC (C = 2, 3, 4) uint16 array, written by hand:
    Pillow writes 16 bits for grayscale only."""
    h, w = array.shape[:2]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[1 if array.ndim == 2 else array.shape[2]]
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def tiff16_rgb(array: np.ndarray) -> bytes:
    """An uncompressed little-endian RGB TIFF of 16 bits per sample (HxWx3 uint16), by hand:
    Pillow opens it as 8-bit RGB, so only its BitsPerSample tag tells."""
    h, w = array.shape[:2]
    pixels = array.astype("<u2").tobytes()
    tags = [(256, w), (257, h), (258, None), (259, 1), (262, 2), (273, None), (277, 3), (278, h), (279, len(pixels))]
    bits_at = 8 + 2 + 12 * len(tags) + 4
    pixels_at = bits_at + 6
    ifd = struct.pack("<H", len(tags))
    for tag, value in tags:
        if tag == 258:
            ifd += struct.pack("<HHII", tag, 3, 3, bits_at)  # three SHORTs, stored after the IFD
        else:
            ifd += struct.pack("<HHII", tag, 4, 1, pixels_at if tag == 273 else value)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + struct.pack("<HHH", 16, 16, 16) + pixels


def saved(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def wide_images() -> dict[str, tuple[bytes, str]]:
    """File name -> (bytes, what the refusal says it holds)."""
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 65536, (H, W), dtype=np.uint16)
    rgb = rng.integers(0, 65536, (H, W, 3), dtype=np.uint16)
    return {
        "gray16.png": (saved(Image.fromarray(gray), "PNG"), "16 bits per channel (Pillow mode I;16)"),
        "rgb16.png": (png16(rgb), "a 16-bit PNG, read by Pillow as mode RGB"),
        "rgba16.png": (png16(rng.integers(0, 65536, (H, W, 4), dtype=np.uint16)), "a 16-bit PNG"),
        "gray16.tif": (saved(Image.fromarray(gray), "TIFF"), "16 bits per channel"),
        "rgb16.tif": (tiff16_rgb(rgb), "a TIFF of BitsPerSample (16, 16, 16)"),
        "float.tif": (saved(Image.fromarray(rng.random((H, W), dtype=np.float32)), "TIFF"), "floating-point values"),
        "int32.tif": (saved(Image.fromarray(gray.astype(np.int32) * 7), "TIFF"), "integers of more than 8 bits"),
    }


def folders_with(tmp_path, name: str, data: bytes, n: int = 4) -> str:
    """Folders of ``n`` good pairs, the image of ``train_001`` replaced by ``data`` saved as ``name``."""
    make_folders(tmp_path, {"train": n}, size=(H, W))
    (tmp_path / "images" / "train" / "train_001.png").unlink()
    path = tmp_path / "images" / "train" / f"train_001.{name.rsplit('.', 1)[1]}"
    path.write_bytes(data)
    return str(path)


def run_pack(tmp_path, **kw):
    return pack(tmp_path / "images", tmp_path / "masks", write_classes(tmp_path / "classes.json"), tmp_path / "out",
                workers=1, progress=False, **kw)


@pytest.mark.parametrize("name", list(wide_images()))
def test_pack_refuses_wide_images_with_the_fix_and_writes_nothing(tmp_path, name):
    data, holds = wide_images()[name]
    path = folders_with(tmp_path, name, data)
    with pytest.raises(InputProblems) as e:
        run_pack(tmp_path, shard_size=1)  # good samples come before and after: nothing of them may stay
    (problem,) = e.value.problems
    assert problem.path == path
    assert holds in problem.what and "unetseg packs 8-bit images only" in problem.what
    assert "convert it to 8 bits per channel" in problem.fix
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_refused_repack_leaves_the_old_shards_as_they_were(tmp_path):
    make_folders(tmp_path, {"train": 3}, size=(H, W))
    run_pack(tmp_path)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    (tmp_path / "images" / "train" / "train_001.png").write_bytes(wide_images()["rgb16.png"][0])
    with pytest.raises(InputProblems, match="16-bit PNG"):
        run_pack(tmp_path, overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert leftovers(tmp_path) == []


def test_skip_invalid_leaves_a_wide_image_out_and_lists_it(tmp_path):
    path = folders_with(tmp_path, "rgb16.png", wide_images()["rgb16.png"][0])
    info, _ = run_pack(tmp_path, skip_invalid=True)
    assert info.splits["train"].num_samples == 3
    skipped = json.loads((tmp_path / "out" / "dataset.json").read_text())["skipped"]
    assert [s["path"] for s in skipped] == [path] and "8 bits per channel" in skipped[0]["fix"]


@pytest.mark.parametrize("encoding", ["index", "rgb"])
def test_pack_refuses_16_bit_masks_with_the_mask_fix(tmp_path, encoding):
    make_folders(tmp_path, {"train": 2}, size=(H, W), mask_encoding=encoding)
    mask = tmp_path / "masks" / "train" / "train_000.png"
    ids = np.asarray(Image.open(mask).convert("RGB" if encoding == "rgb" else "L")).astype(np.uint16)
    # 16-bit files holding the same classes: ids as they are, colours scaled to 16 bits.
    mask.write_bytes(png16(ids * 257) if encoding == "rgb" else saved(Image.fromarray(ids), "PNG"))
    with pytest.raises(InputProblems) as e:
        run_pack(tmp_path, mask_encoding=encoding, unknown_color="ignore" if encoding == "rgb" else "error")
    (problem,) = e.value.problems
    assert problem.path == str(mask) and "16" in problem.what and "unetseg packs 8-bit masks only" in problem.what
    assert "class ids unchanged" in problem.fix
    assert not (tmp_path / "out").exists()


def eight_bit_images() -> dict[str, bytes]:
    """8-bit files of every mode pack converts or keeps (name -> bytes)."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    pal = Image.fromarray(rng.integers(0, 4, (H, W), dtype=np.uint8), "P")
    pal.putpalette([10, 20, 30, 200, 100, 50, 0, 255, 0, 9, 9, 9])
    return {
        "l.png": saved(Image.fromarray(rgb[..., 0], "L"), "PNG"),
        "p_transparent.png": saved(pal, "PNG", transparency=0),
        "rgba.png": saved(Image.fromarray(rng.integers(0, 256, (H, W, 4), dtype=np.uint8), "RGBA"), "PNG"),
        "la.png": saved(Image.fromarray(rgb[..., :2].copy(), "LA"), "PNG"),
        "one_bit.png": saved(Image.fromarray(rgb[..., 0] > 127), "PNG"),
        "rgb.tif": saved(Image.fromarray(rgb), "TIFF"),
        "cmyk.jpg": saved(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95),
    }


@pytest.mark.parametrize("name", list(eight_bit_images()))
def test_eight_bit_modes_pack_and_training_reads_what_pillow_reads(tmp_path, name):
    from unetseg.shards import iter_shard
    from unetseg.stream import decode_pair

    data = eight_bit_images()[name]
    folders_with(tmp_path, name, data, n=2)
    run_pack(tmp_path)
    (sample,) = [s for s in iter_shard(tmp_path / "out" / "train-000000.tar") if s["__key__"] == "train_001"]
    ext = "jpg" if "jpg" in sample else "png"
    trained_on = decode_pair(sample)[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(trained_on, decode_image(sample[ext]))  # torchvision == Pillow
    if ext == "png":  # converted (or kept) without loss: the pixels predict would read
        np.testing.assert_array_equal(trained_on, to_rgb_array(Image.open(io.BytesIO(data))))


def rgb16_like(folder, split: str) -> bytes:
    """A 16-bit RGB PNG of the size of a split's (synthetic, same-size) images."""
    from unetseg.dataset import DatasetInfo

    h, w = next(iter(DatasetInfo.load(folder).splits[split].shapes()))
    return png16(np.full((h, w, 3), 40000, np.uint16))


def test_training_decoder_rejects_a_16_bit_image_as_a_counted_bad_sample(tmp_path):
    from unetseg.badsamples import StreamStats
    from unetseg.loaders import iterate, make_loader
    from unetseg.sources import open_source
    from unetseg.stream import EvalStream, decode_pair
    from unetseg.transforms import EvalTransform, EvalTransformConfig

    with pytest.raises(ValueError, match="uint16"):
        decode_pair({"png": png16(np.zeros((2, 3, 3), np.uint16)), "mask.png": saved(Image.new("L", (3, 2)), "PNG")})
    folder = make(tmp_path, "s", train=2, val=4, size="16x16")
    bad_key = replace_image(folder, "val-000000.tar", 1, rgb16_like(folder, "val"), "png")
    stats = StreamStats(max_bad_samples=3)
    stream = EvalStream(open_source(folder, "val"), EvalTransform(EvalTransformConfig()), 2)
    keys = [k for b in iterate(make_loader(stream), stats) for k in b["keys"]]
    assert bad_key not in keys and len(keys) == 3
    assert stats.bad_samples == 1 and bad_key in stats.problems()[0] and "16-bit" in stats.problems()[0]


def test_verify_fails_on_what_training_rejects(tmp_path):
    from unetseg.shards import verify_shards

    folder = make(tmp_path, "s", train=2, val=2, size="16x16")
    assert verify_shards(folder, progress=False) == []
    bad_key = replace_image(folder, "train-000000.tar", 0, rgb16_like(folder, "train"), "png")
    problems = verify_shards(folder, progress=False)
    assert len(problems) == 1 and f"sample {bad_key!r}" in problems[0] and "uint16" in problems[0], problems


def test_predict_refuses_wide_inputs_and_segments_the_others(tmp_path):
    from test_predict import make_model
    from unetseg.predict import load_image, predict

    folder = tmp_path / "in"
    folder.mkdir()
    wide = wide_images()
    names = ("gray16.png", "rgb16.png", "gray16.tif")
    for name in names:
        (folder / name).write_bytes(wide[name][0])
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(folder / "good.png")
    report = predict(make_model(tmp_path), [folder], tmp_path / "out", progress=False)
    assert report.num_written == 1 and report.num_failed == 3
    for failure in report.failures:
        assert "16 bits per channel" in failure.what and "convert it to 8 bits" in failure.fix, failure
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.png", "good_color.png"]
    from unetseg.imageio import BitDepthError

    for name in names:
        with pytest.raises(BitDepthError, match="16 bits per channel"):
            load_image(folder / name)
