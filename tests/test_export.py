"""unetseg export: TorchScript and ONNX files that match the eager model, loaded back
independently of the export's own check, on sizes other than the one exported with."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from unetseg.checkpoint import load_model, save_model
from unetseg.config import TrainConfig
from unetseg.dataset import DatasetInfo, SplitInfo
from unetseg.errors import UnetsegError
from unetseg.export import RTOL, export, main_export
from unetseg.models.unet import UNet, UNetConfig
from unetseg.synth import CLASS_NAMES, synth_classes

# Sizes besides the exported one (24x40, the most common in dataset.json below): other
# remainders modulo 2**depth, another batch size, a 1x1 image.
OTHER_SHAPES = [(3, 3, 33, 19), (1, 3, 1, 1), (2, 3, 48, 64)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    net = UNet(UNetConfig(num_classes=10, width=4, depth=2))
    sizes = {"train": {"24x40": 3, "32x32": 2}, "val": {"32x32": 1}}
    info = DatasetInfo(classes=synth_classes(),
                       splits={name: SplitInfo(4, [], [], [0] * 10, 0, s) for name, s in sizes.items()})
    save_model(folder / "best", net, {**TrainConfig().to_dict(), "unet": net.config.to_dict()}, info)
    return folder / "best"


def compare(model_dir: Path, run) -> None:
    model = load_model(model_dir)[0].eval()
    generator = torch.Generator().manual_seed(1)
    for shape in OTHER_SHAPES:
        x = torch.randn(*shape, generator=generator)
        with torch.no_grad():
            expected = model(x)
        got = run(x)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=0, atol=RTOL * max(1.0, float(expected.abs().max())))


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_matches_eager(tmp_path, model_dir):
    out = tmp_path / "sub" / "model.pt"
    report = export(model_dir, "torchscript", out)
    assert report.path == out and out.is_file()
    assert report.example_size == (24, 40)
    assert [shape for shape, _, _ in report.checks] == [(1, 3, 24, 40), (2, 3, 15, 25)]
    assert all(diff <= tol for _, diff, tol in report.checks)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.pt"]  # no temporary left

    extra = {"unetseg.json": ""}
    module = torch.jit.load(str(out), _extra_files=extra)
    meta = json.loads(extra["unetseg.json"])
    assert meta["classes"]["names"] == CLASS_NAMES and meta["mean"] == [0.485, 0.456, 0.406]

    def run(x):
        with torch.no_grad():
            return module(x)

    compare(model_dir, run)


def test_onnx_matches_eager(tmp_path, model_dir, capsys):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "model.onnx"
    assert main_export(model_dir, "onnx", out) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "opset 18" in printed and "max |diff|" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # one file: weights inside

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.shape) == ("image", ["batch", 3, "height", "width"])
    assert (outp.name, outp.shape) == ("logits", ["batch", 10, "height", "width"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["unetseg"])
    assert meta["classes"]["palette"][1] == [230, 25, 75] and meta["model"]["depth"] == 2 and meta["model"]["name"] == "unet"

    compare(model_dir, lambda x: torch.from_numpy(session.run(None, {"image": x.numpy()})[0]))


def test_explicit_size(tmp_path, model_dir):
    report = export(model_dir, "torchscript", tmp_path / "m.pt", height=17, width=9)
    assert report.example_size == (17, 9)
    assert [shape for shape, _, _ in report.checks] == [(1, 3, 17, 9), (2, 3, 11, 9)]


def test_bad_options_error_clearly(tmp_path, model_dir):
    with pytest.raises(UnetsegError, match="format 'tflite': not one of onnx, torchscript"):
        export(model_dir, "tflite", tmp_path / "m.tflite")
    with pytest.raises(UnetsegError, match="a folder"):
        export(model_dir, "torchscript", tmp_path)
    with pytest.raises(UnetsegError, match="give both or neither"):
        export(model_dir, "torchscript", tmp_path / "m.pt", height=32)
    with pytest.raises(UnetsegError, match="opset 17"):
        export(model_dir, "onnx", tmp_path / "m.onnx", opset=17)
    assert list(tmp_path.iterdir()) == []


def test_missing_onnx_package_names_the_fix(tmp_path, model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(UnetsegError, match=r"missing: onnxruntime\. Fix: pip install onnx onnxscript onnxruntime"):
        export(model_dir, "onnx", tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_failed_check_writes_nothing(tmp_path, model_dir, monkeypatch):
    import unetseg.export as export_module

    real = export_module._torchscript_runner
    monkeypatch.setattr(export_module, "_torchscript_runner", lambda path: (lambda x: real(path)(x) + 0.01))
    out = tmp_path / "m.pt"
    out.write_bytes(b"an older export")
    with pytest.raises(UnetsegError, match="differs from the eager model by up to 0.01"):
        export(model_dir, "torchscript", out)
    assert out.read_bytes() == b"an older export"  # untouched, and no temporary left
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]
