"""unetseg predict: outputs and their sizes, palette, failures, renamed inputs, and
predictions equal to the model run directly on the evaluation transform's input. The
input and naming rules themselves are tested in test_predict_inputs.py."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torchvision import tv_tensors

from conftest import clashing_images
from unetseg.checkpoint import load_model, save_model
from unetseg.config import TrainConfig
from unetseg.dataset import DatasetInfo, SplitInfo
from unetseg.errors import UnetsegError
from unetseg.models.unet import UNet, UNetConfig
from unetseg.predict import main_predict, predict
from unetseg.synth import PALETTE, synth_classes
from unetseg.transforms import EvalTransform, EvalTransformConfig

ORIENTATION = 0x0112


def make_model(folder: Path, eval_resize: list[int] | None = None) -> Path:
    """A tiny untrained 10-class U-Net saved as ``folder/run/best`` (returns the run dir)."""
    torch.manual_seed(0)
    net = UNet(UNetConfig(num_classes=10, width=4, depth=2))
    config = TrainConfig().to_dict()
    config["data"]["eval_resize"] = eval_resize
    info = DatasetInfo(classes=synth_classes(), splits={"train": SplitInfo(2, [], [], [0] * 10, 0, {"24x40": 2})})
    save_model(folder / "run" / "best", net, {**config, "unet": net.config.to_dict()}, info)
    return folder / "run"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("model"))


def displayed_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))


def direct_ids(model_dir: Path, rgb: np.ndarray) -> np.ndarray:
    """The model run on one image exactly as evaluation feeds it (EvalTransform), argmax."""
    model, config, _ = load_model(model_dir)
    resize = config["data"]["eval_resize"]
    image = tv_tensors.Image(torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous())
    mask = tv_tensors.Mask(torch.zeros(rgb.shape[:2], dtype=torch.uint8))
    x, _ = EvalTransform(EvalTransformConfig(resize=resize))(image, mask)
    with torch.no_grad():
        logits = model.eval()(x[None])
    if resize is not None:
        logits = F.interpolate(logits, size=rgb.shape[:2], mode="bilinear", align_corners=False)
    return logits.argmax(1)[0].numpy().astype(np.uint8)


def read(path: Path) -> tuple[str, np.ndarray]:
    with Image.open(path) as img:
        return img.mode, np.asarray(img)


def check_outputs(out: Path, stem: str, source: Path, model_dir: Path, overlay: bool, alpha: float = 0.5) -> np.ndarray:
    """The three outputs of one input: sizes, palette, overlay blend and the prediction itself."""
    rgb = displayed_rgb(source)
    mode, ids = read(out / f"{stem}.png")
    assert mode == "L" and ids.shape == rgb.shape[:2]
    assert ids.max() < 10
    np.testing.assert_array_equal(ids, direct_ids(model_dir, rgb))
    mode, color = read(out / f"{stem}_color.png")
    assert mode == "RGB" and color.shape == rgb.shape
    np.testing.assert_array_equal(color, np.asarray(PALETTE, dtype=np.uint8)[ids])
    if overlay:
        mode, blended = read(out / f"{stem}_overlay.png")
        assert mode == "RGB" and blended.shape == rgb.shape
        expected = (1 - alpha) * rgb.astype(np.float64) + alpha * color
        assert np.abs(blended - expected).max() <= 0.5 + 1e-3
    else:
        assert not (out / f"{stem}_overlay.png").exists()
    return ids


def write_inputs(folder: Path) -> dict[str, tuple[int, int]]:
    """Good images of every kind (name -> displayed H, W), plus a corrupt and a truncated file."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)).save(folder / "odd.jpg", quality=95)
    Image.fromarray(rng.integers(0, 256, (20, 30), dtype=np.uint8), mode="L").save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 256, (25, 18, 4), dtype=np.uint8), mode="RGBA").save(folder / "rgba.png")
    # Stored 45 wide and 30 tall; orientation 6 (rotate 90 degrees clockwise) displays it 30 wide, 45 tall.
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    Image.fromarray(rng.integers(0, 256, (30, 45, 3), dtype=np.uint8)).save(folder / "rotated.jpg", exif=exif, quality=95)
    (folder / "broken.jpg").write_bytes(b"this is not a JPEG")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
    (folder / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "notes.txt").write_text("not an image extension: not an input")
    return {"odd": (37, 53), "gray": (20, 30), "rgba": (25, 18), "rotated": (45, 30)}


def test_folder_of_mixed_images_with_failures(tmp_path, model_dir, capsys):
    sizes = write_inputs(tmp_path / "in")
    with Image.open(tmp_path / "in" / "rotated.jpg") as img:
        assert img.size == (45, 30)  # stored pixels: W x H

    code = main_predict(model_dir, [str(tmp_path / "in")], tmp_path / "out", overlay=True, alpha=0.4, batch_size=4)

    assert code == 1
    captured = capsys.readouterr()
    assert "broken.jpg" in captured.err and "truncated.png" in captured.err
    assert "4 of 6 images" in captured.out
    out = tmp_path / "out"
    expected_files = {f"{stem}{suffix}.png" for stem in sizes for suffix in ("", "_color", "_overlay")}
    assert {p.name for p in out.iterdir()} == expected_files  # nothing for the failures, no temporaries
    classes_seen = set()
    for stem, (h, w) in sizes.items():
        source = next((tmp_path / "in").glob(f"{stem}.*"))
        ids = check_outputs(out, stem, source, model_dir, overlay=True, alpha=0.4)
        assert ids.shape == (h, w)
        classes_seen |= set(np.unique(ids).tolist())
    assert len(classes_seen) > 1  # the comparison with the direct prediction is not between constants


def test_report_names_failures(tmp_path, model_dir):
    write_inputs(tmp_path / "in")
    report = predict(model_dir, [tmp_path / "in"], tmp_path / "out", progress=False)
    assert report.num_written == 4 and report.num_failed == 2
    assert [Path(p.path).name for p in report.failures] == ["broken.jpg", "truncated.png"]  # input order
    assert all("unreadable image" in p.what for p in report.failures)
    assert [src.name for src, _ in report.written] == ["gray.png", "odd.jpg", "rgba.png", "rotated.jpg"]


def test_glob_file_new_nested_out_and_batching(tmp_path, model_dir, capsys):
    rng = np.random.default_rng(1)
    (tmp_path / "b").mkdir()
    for name in ("p1", "p2", "p3"):  # one size: batched together
        Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(tmp_path / "b" / f"{name}.png")
    Image.fromarray(rng.integers(0, 256, (33, 17, 3), dtype=np.uint8)).save(tmp_path / "single.bmp")
    out = tmp_path / "deep" / "new" / "out"

    inputs = [str(tmp_path / "b" / "*.png"), str(tmp_path / "single.bmp"), str(tmp_path / "b" / "p2.png")]
    code = main_predict(model_dir, inputs, out, overlay=False, alpha=0.5, batch_size=2)

    assert code == 0
    assert "4 of 4 images" in capsys.readouterr().out
    assert len(list(out.iterdir())) == 8
    for name, source in [("p1", "b/p1.png"), ("p2", "b/p2.png"), ("p3", "b/p3.png"), ("single", "single.bmp")]:
        check_outputs(out, name, tmp_path / source, model_dir, overlay=False)


def test_shared_stems_get_distinct_names(tmp_path, model_dir):
    paths = clashing_images(tmp_path)
    stems = ["a__x_png", "b__x", "a__x_jpg", "a__x_color_png", "y"]  # the rules: test_predict_inputs.py

    report = predict(model_dir, [str(p) for p in paths], tmp_path / "out", progress=False)
    assert report.num_written == 5
    assert report.renamed == dict(zip(paths[:4], stems[:4]))
    assert len(list((tmp_path / "out").iterdir())) == 10  # nothing overwritten
    for path, stem in zip(paths, stems):
        check_outputs(tmp_path / "out", stem, path, model_dir, overlay=False)


def test_eval_resize_model_predicts_at_input_size(tmp_path):
    model_dir = make_model(tmp_path / "m", eval_resize=[32, 32])
    rng = np.random.default_rng(3)
    (tmp_path / "in").mkdir()
    Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)).save(tmp_path / "in" / "img.png")
    report = predict(model_dir, [tmp_path / "in"], tmp_path / "out", progress=False)
    assert report.num_written == 1
    check_outputs(tmp_path / "out", "img", tmp_path / "in" / "img.png", model_dir, overlay=False)


def test_option_errors_write_nothing(tmp_path, model_dir):
    (tmp_path / "empty").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "empty" / "a.png")
    with pytest.raises(UnetsegError, match="alpha 1.5"):
        predict(model_dir, [tmp_path / "empty"], tmp_path / "out", alpha=1.5, progress=False)
    with pytest.raises(UnetsegError, match="batch size 0"):
        predict(model_dir, [tmp_path / "empty"], tmp_path / "out", batch_size=0, progress=False)
    assert not (tmp_path / "out").exists()


def test_refuses_to_overwrite_an_input(tmp_path, model_dir):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(folder / "a.png")  # its class-id output would be folder/a.png
    before = (folder / "a.png").read_bytes()
    with pytest.raises(UnetsegError, match="a.png there would replace the input"):
        predict(model_dir, [folder], folder, progress=False)
    assert (folder / "a.png").read_bytes() == before
    assert [p.name for p in folder.iterdir()] == ["a.png"]


def test_compiled_prediction_compiles_once_for_sizes_that_round_alike(tmp_path, model_dir, monkeypatch):
    """`compile="on"` (torch.compile's graphs run eagerly: seconds on a CPU): three image
    sizes and a short batch that all pad to 32x40 share one graph, and the predictions
    are the uncompiled model's."""
    import functools

    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counter))
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i, (h, w) in enumerate([(30, 40), (29, 38), (31, 37), (30, 40), (30, 40)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    report = predict(model_dir, [folder], tmp_path / "out", batch_size=2, device="cpu", compile="on", progress=False)
    assert report.num_written == 5
    assert counter.frame_count == 1
    for i in range(5):
        check_outputs(tmp_path / "out", f"im{i}", folder / f"im{i}.png", model_dir, overlay=False)
