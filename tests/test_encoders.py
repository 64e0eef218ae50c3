"""U-Nets on timm encoders (issue 24): the decoder sized from the encoder, weights from a
file loaded exactly or refused by name, ImageNet weights from the Hugging Face cache with
no network (and the error without them), adapted stems, the encoder's lr and freeze, and
the whole path (train, resume, evaluate, predict, export) with an encoder model. timm's
``test_*`` models keep it small; nothing is downloaded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm", reason="timm is not installed (pip install 'unetseg[timm]')")

from safetensors.torch import load_file, save_file  # noqa: E402

from unetseg.errors import UnetsegError  # noqa: E402
from unetseg.models import build_model  # noqa: E402
from unetseg.models.unet import UNetConfig  # noqa: E402
from unetseg.synth import synth  # noqa: E402

ENCODER = "test_efficientnet"
TINY = ["--batch-size", "4", "--num-workers", "0", "--tracker", "none", "--crop-size", "32", "--lr", "0.005",
        "--model-encoder", ENCODER, "--model-width", "4"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data") / "syn"
    synth(folder, train=16, val=4, size="48x48", shard_size=8, workers=1, progress=False)
    return folder


def encoder_file(tmp_path: Path, whole: bool = False, seed: int = 1) -> tuple[Path, dict[str, torch.Tensor]]:
    """Random weights of the encoder (timm's feature-model names) or of the whole classifier."""
    torch.manual_seed(seed)
    net = timm.create_model(ENCODER) if whole else timm.create_model(ENCODER, features_only=True)
    tensors = {k: v.clone() for k, v in net.state_dict().items()}
    path = tmp_path / ("classifier.safetensors" if whole else "encoder.safetensors")
    save_file(tensors, str(path))
    return path, tensors


def unet(**kw) -> torch.nn.Module:
    return build_model(UNetConfig(num_classes=5, encoder=ENCODER, width=4, **kw))


def test_the_decoder_follows_the_encoders_feature_maps():
    net = unet()
    strides = net.encoder.feature_info.reduction()
    assert net.pad_multiple == strides[-1] and len(net.decoder) == len(strides) - 1 + strides[0].bit_length() - 1
    assert net(torch.zeros(2, 3, 45, 70)).shape == (2, 5, 45, 70)  # any size: padded and cropped back
    logits, stages = net.forward_stages(torch.zeros(1, 3, 64, 64))
    assert [s.shape[1] for s in stages] == net.stage_channels() and len(stages) == len(net.decoder) - 1
    # Each stage's channels are the from-scratch U-Net's at its stride: width * stride.
    assert [s.shape[1] for s in stages] == [4 * (64 // s.shape[-1]) for s in stages]


def test_weights_from_a_file_load_exactly(tmp_path, capsys):
    path, tensors = encoder_file(tmp_path)
    net = unet(encoder_weights=str(path))
    got = net.encoder.state_dict()
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in tensors)
    assert f"{len(tensors)} tensors from {path}" in capsys.readouterr().out


def test_a_whole_classifier_loads_its_encoder_and_says_the_head_is_left_out(tmp_path, capsys):
    path, tensors = encoder_file(tmp_path, whole=True)
    net = unet(encoder_weights=str(path))
    got = net.encoder.state_dict()
    assert all(torch.equal(got[k], tensors[k]) for k in got)  # the feature model's names are the classifier's
    out = capsys.readouterr().out
    assert "left out the classifier head" in out and "classifier.weight" in out


def test_a_wrong_file_names_every_bad_tensor(tmp_path):
    path, tensors = encoder_file(tmp_path)
    first = next(iter(tensors))
    broken = dict(tensors)
    del broken[first]
    broken["extra.weight"] = torch.zeros(1)
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(UnetsegError) as e:
        unet(encoder_weights=str(tmp_path / "broken.safetensors"))
    assert f"missing: {first}" in str(e.value) and "unexpected: extra.weight" in str(e.value) and "Fix:" in str(e.value)
    last = [k for k in tensors if tensors[k].ndim == 4][-1]
    reshaped = {**tensors, last: torch.zeros(tensors[last].shape[0] + 1, *tensors[last].shape[1:])}
    save_file(reshaped, str(tmp_path / "shape.safetensors"))
    with pytest.raises(UnetsegError, match=f"{last}: \\({tensors[last].shape[0] + 1}, "):
        unet(encoder_weights=str(tmp_path / "shape.safetensors"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UnetsegError, match="junk.pt: not a safetensors or PyTorch weights file"):
        unet(encoder_weights=str(tmp_path / "junk.pt"))
    with pytest.raises(UnetsegError, match="no such file"):
        unet(encoder_weights=str(tmp_path / "missing.safetensors"))


def test_a_pickled_state_dict_works_and_four_channels_adapt_the_rgb_stem(tmp_path):
    _, tensors = encoder_file(tmp_path)
    torch.save({"state_dict": tensors}, tmp_path / "encoder.pth")
    net = build_model(UNetConfig(num_classes=5, encoder=ENCODER, width=4, in_channels=4,
                                 encoder_weights=str(tmp_path / "encoder.pth")))
    stem = next(k for k, v in tensors.items() if v.ndim == 4)
    rgb, got = tensors[stem], net.encoder.state_dict()[stem]
    assert got.shape[1] == 4
    # The RGB filters repeated over the channels (R, G, B, R) and scaled by 3/4.
    assert torch.allclose(got, torch.cat([rgb, rgb[:, :1]], 1) * 3 / 4)
    assert net.eval()(torch.zeros(1, 4, 32, 32)).shape == (1, 5, 32, 32)


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def test_imagenet_weights_offline_come_from_the_cache_or_a_clear_error(tmp_path, data):
    hub = tmp_path / "hub"
    offline = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub)}
    # No network and nothing cached: the error names both ways out.
    cmd = [sys.executable, "-m", "unetseg.train", "--data", str(data), "--output-dir", str(tmp_path / "run"), *TINY,
           "--max-steps", "1", "--model-encoder-weights", "imagenet"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **offline})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"could not get the pretrained weights of {ENCODER!r}" in result.stderr and str(hub) in result.stderr
    assert "run once on a machine with network" in result.stderr and "--model-encoder-weights PATH" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
    # The same weights in the Hugging Face cache's layout load with no network.
    path, tensors = encoder_file(tmp_path, whole=True)
    hub_id = timm.models.get_pretrained_cfg(ENCODER).hf_hub_id
    repo = hub / f"models--{hub_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    shutil.copy(path, repo / "snapshots" / ("0" * 40) / "model.safetensors")
    code = (f"from unetseg.models import build_model; from unetseg.models.unet import UNetConfig; "
            f"from safetensors.torch import load_file; import torch; "
            f"net = build_model(UNetConfig(num_classes=5, encoder={ENCODER!r}, encoder_weights='imagenet')); "
            f"ref = load_file({str(path)!r}); sd = net.encoder.state_dict(); "
            f"print(all(torch.equal(sd[k], ref[k]) for k in sd))")
    result = run_python(code, offline)
    assert result.returncode == 0 and result.stdout.strip().endswith("True"), result.stderr[-2000:]


def test_the_encoder_trains_at_its_own_lr_and_can_start_frozen():
    from unetseg.optim import build_optimizer, build_scheduler

    net = unet()
    optimizer = build_optimizer(net, lr=0.01, encoder_lr_mult=0.1)
    groups = optimizer.param_groups
    encoder = {id(p) for p in net.encoder.parameters()}
    assert [g["name"] for g in groups] == ["decay", "no_decay", "encoder_decay", "encoder_no_decay"]
    assert all((id(p) in encoder) == g.get("encoder", False) for g in groups for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    scheduler = build_scheduler(optimizer, "constant", total_steps=10, encoder_freeze_steps=3)
    lrs = []
    for _ in range(5):
        lrs.append([round(g["lr"], 6) for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert [lr[0] for lr in lrs] == [0.01] * 5 and [lr[2] for lr in lrs] == [0, 0, 0, 0.001, 0.001]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_an_encoder_model_trains_resumes_bitwise_evaluates_predicts_and_exports(tmp_path, data):
    weights, _ = encoder_file(tmp_path)
    common = [*TINY, "--max-steps", "6", "--save-every", "3", "--eval-every", "3", "--log-every", "1",
              "--model-encoder-weights", str(weights), "--encoder-lr-mult", "0.5", "--deep-supervision", "0.4"]
    train = [sys.executable, "-m", "unetseg.train", "--data", str(data)]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run([*train, "--output-dir", str(straight), *common])
    run([*train, "--output-dir", str(resumed), *common])
    shutil.rmtree(resumed / "checkpoints" / "step-00000006")
    shutil.rmtree(resumed / "final")
    weights.unlink()  # a resume loads the checkpoint's weights: the encoder's file is not read again
    run([*train, "--output-dir", str(resumed), *common, "--resume", "auto"])
    a, b = load_file(straight / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("encoder.") for k in a)
    saved = (straight / "final" / "config.yaml").read_text()
    assert f"encoder: {ENCODER}" in saved and "mean:" in saved  # rebuilds without timm's weights or a lookup

    cli = [sys.executable, "-m", "unetseg"]
    run([*cli, "evaluate", str(straight / "final"), "--data", str(data), "--out", str(tmp_path / "eval.json")])
    assert 0 <= json.loads((tmp_path / "eval.json").read_text())["mIoU"] <= 1
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (45, 37), (40, 90, 200)).save(images / "a.png")
    run([*cli, "predict", str(straight / "final"), str(images), "--out", str(tmp_path / "pred")])
    assert Image.open(tmp_path / "pred" / "a.png").size == (45, 37)
    for fmt, name in (("torchscript", "model.pt"), ("onnx", "model.onnx")):  # each checked against the eager model
        result = run([*cli, "export", str(straight / "final"), "--format", fmt, "--out", str(tmp_path / name)])
        assert "checked against the eager model" in result.stdout and (tmp_path / name).stat().st_size > 0


def test_the_normalisation_follows_the_encoder_into_the_saved_model_and_predict(tmp_path, data):
    """tf_efficientnet_lite0's weights expect (x - 0.5) / 0.5, not ImageNet's mean and std."""
    from unetseg.predict import Segmenter

    assert UNetConfig(encoder="tf_efficientnet_lite0").normalization() == ((0.5,) * 3, (0.5,) * 3)
    assert UNetConfig().normalization() == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    out = tmp_path / "run"
    result = run([sys.executable, "-m", "unetseg.train", "--data", str(data), "--output-dir", str(out), *TINY,
                  "--model-encoder", "tf_efficientnet_lite0", "--max-steps", "1"])
    assert "encoder=tf_efficientnet_lite0" in result.stdout
    segment = Segmenter(out / "final")
    assert (segment.mean, segment.std) == ((0.5,) * 3, (0.5,) * 3)
    from unetseg.checkpoint import load_model

    _, config, _ = load_model(out / "final")
    assert config["model"]["mean"] == [0.5] * 3 and config["model"]["std"] == [0.5] * 3


def test_residual_blocks_channels_last_and_one_static_compiled_graph(tmp_path, data, monkeypatch, capsys):
    from conftest import run_main

    graphs: list[bool] = []

    def backend(gm, example_inputs):
        values = [node.meta.get("example_value") for node in gm.graph.nodes if node.op == "placeholder"]
        graphs.append(any(isinstance(v, torch.SymInt) or isinstance(v, torch.Tensor)
                          and any(isinstance(side, torch.SymInt) for side in v.shape) for v in values))
        return gm.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend=backend, **kw))
    torch._dynamo.reset()
    code, out, err = run_main("train", ["--data", str(data), "--output-dir", str(tmp_path / "run"), *TINY,
                                        "--model-block", "residual", "--mixed-precision", "no", "--channels-last", "on",
                                        "--compile", "on", "--max-steps", "2", "--eval-every", "2"], capsys)
    torch._dynamo.reset()
    assert code == 0, err[-3000:]
    assert "block=residual" in out and "mixed precision no, channels_last, compiled" in out
    assert graphs == [False, False]  # one static graph for training, one for validation


def test_an_encoder_model_trains_in_bf16(tmp_path, data):
    """In its own process: Accelerate's precision is fixed once per process."""
    out = tmp_path / "run"
    result = run([sys.executable, "-m", "unetseg.train", "--data", str(data), "--output-dir", str(out), *TINY,
                  "--mixed-precision", "bf16", "--max-steps", "2", "--log-every", "1", "--eval-every", "2"])
    assert "mixed precision bf16" in result.stdout
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 2 and all(0 < loss < 100 for loss in losses)


def test_an_unknown_encoder_or_missing_timm_names_the_fix(monkeypatch):
    with pytest.raises(UnetsegError, match=r"model.encoder 'resnet5': timm has no such model.*e\.g\. .*resnet"):
        build_model(UNetConfig(num_classes=5, encoder="resnet5"))
    monkeypatch.setitem(sys.modules, "timm", None)  # as if not installed
    with pytest.raises(UnetsegError, match=r"needs the timm package.*pip install 'unetseg\[timm\]'"):
        build_model(UNetConfig(num_classes=5, encoder=ENCODER))
