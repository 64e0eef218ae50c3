"""A training checkpoint (RUN/checkpoints/step-N) as a model: evaluate, predict and export
load it with the run dir's config and dataset.json, without deep supervision's heads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import run_main, train_tiny
from unetseg.checkpoint import load_model
from unetseg.errors import UnetsegError
from unetseg.synth import synth

@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny run with deep supervision, checkpoints at steps 2 and 4 (its last), and its shards."""
    root = tmp_path_factory.mktemp("ckpt_eval")
    synth(root / "syn", train=8, val=4, size="32x40", shard_size=4, workers=1, progress=False)
    train_tiny(root / "syn", root / "run", "--max-steps", 4, "--save-every", 2, "--eval-every", 2,
               "--deep-supervision", 0.5)
    return root / "run", root / "syn"


def step(run_dir: Path, n: int) -> Path:
    return run_dir / "checkpoints" / f"step-{n:08d}"


def evaluate(model: Path, data: Path, out: Path, capsys) -> dict:
    code, _, err = run_main("evaluate", [model, "--data", data, "--out", out, "--num-workers", "0"], capsys)
    assert code == 0, err[-3000:]
    return json.loads(out.read_text())


def test_evaluate_on_the_last_checkpoint_equals_final(tmp_path, run, capsys):
    run_dir, data = run
    final = evaluate(run_dir / "final", data, tmp_path / "final.json", capsys)
    ckpt = evaluate(step(run_dir, 4), data, tmp_path / "ckpt.json", capsys)
    assert ckpt["model"] == str(step(run_dir, 4))
    assert ckpt["mIoU"] == final["mIoU"] and ckpt["confusion_matrix"] == final["confusion_matrix"]
    assert ckpt["num_samples"] == final["num_samples"] == 4
    # Both are recorded in the run's evaluations.jsonl, for unetseg report, each named.
    recorded = [json.loads(line) for line in (run_dir / "evaluations.jsonl").read_text().splitlines()]
    assert [r["model"] for r in recorded][-2:] == ["final", "checkpoints/step-00000004"]
    # an earlier checkpoint loads too, with its own (other) weights
    early, _, _ = load_model(step(run_dir, 2))
    last, config, info = load_model(step(run_dir, 4))
    assert early.state_dict().keys() == last.state_dict().keys()
    assert not all(torch.equal(a, b) for a, b in zip(early.state_dict().values(), last.state_dict().values()))
    assert config["model"]["num_classes"] == info.num_classes == 10  # the built options, as in a saved model


def test_predict_on_a_checkpoint_writes_final_s_predictions(tmp_path, run):
    from unetseg.predict import predict

    run_dir, _ = run
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(tmp_path / f"in{i}.png")
    inputs = [tmp_path / "in0.png", tmp_path / "in1.png"]
    for name, model in (("final", run_dir / "final"), ("ckpt", step(run_dir, 4))):
        report = predict(model, inputs, tmp_path / name, progress=False, device="cpu")
        assert report.num_written == 2 and not report.failures
    for i in range(2):
        assert (tmp_path / "ckpt" / f"in{i}.png").read_bytes() == (tmp_path / "final" / f"in{i}.png").read_bytes()


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_export_a_checkpoint(tmp_path, run):
    from unetseg.export import export

    run_dir, _ = run
    report = export(step(run_dir, 4), "torchscript", tmp_path / "model.pt")
    assert all(diff <= tol for _, diff, tol in report.checks)
    scripted = torch.jit.load(str(tmp_path / "model.pt"))
    final, _, _ = load_model(run_dir / "final")
    x = torch.randn(1, 3, 32, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), final.eval()(x))


def test_the_config_is_the_one_the_checkpoint_was_trained_with(tmp_path, run, capsys):
    """A session resumed at step 2 with eval_resize 24,32 trained step 4; step 2 was trained
    by the first session, with config.yaml (no eval_resize)."""
    run_dir, data = run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    resumed = yaml.safe_load((copy / "config.yaml").read_text())
    resumed["data"]["eval_resize"] = [24, 32]
    (copy / "config.resumed-step-00000002.yaml").write_text(yaml.safe_dump(resumed))
    with (copy / "sessions.jsonl").open("a") as f:
        f.write(json.dumps({"event": "start", "step": 2}) + "\n")
    assert evaluate(step(copy, 4), data, tmp_path / "late.json", capsys)["eval_resize"] == [24, 32]
    assert evaluate(step(copy, 2), data, tmp_path / "early.json", capsys)["eval_resize"] is None


def test_which_session_trained_a_step(tmp_path):
    from unetseg.checkpoint import trained_with

    for name in ("config.yaml", "config.resumed-step-00000010.yaml", "config.resumed-step-00000030.yaml"):
        (tmp_path / name).write_text("{}")
    # resumed at 10 (other options), at 20 (the original ones: no file), at 30 (other options)
    (tmp_path / "sessions.jsonl").write_text("".join(json.dumps({"event": e, "step": s}) + "\n" for e, s in
                                                     [("start", 0), ("start", 10), ("start", 20), ("start", 30)]))
    assert [trained_with(tmp_path, s).name for s in (5, 10, 11, 20, 25, 31)] == [
        "config.yaml", "config.yaml", "config.resumed-step-00000010.yaml", "config.resumed-step-00000010.yaml",
        "config.yaml", "config.resumed-step-00000030.yaml"]
    (tmp_path / "sessions.jsonl").unlink()  # no record of the starts: the resumed configs' steps
    assert trained_with(tmp_path, 25).name == "config.resumed-step-00000010.yaml"


def test_net_weights_drop_wrappers_and_heads():
    from unetseg.checkpoint import net_weights

    t = torch.zeros(1)
    assert net_weights({"module.net.a": t, "module.heads.0.weight": t}) == {"a": t}  # DDP + deep supervision
    assert net_weights({"module.a": t, "module.b": t}) == {"a": t, "b": t}
    assert net_weights({"a": t, "net.b": t}) == {"a": t, "net.b": t}  # no heads: a plain model's keys


def test_a_moved_or_unfinished_checkpoint_is_a_clear_error(tmp_path, run, capsys):
    run_dir, data = run
    moved = tmp_path / "elsewhere" / "step-00000004"
    shutil.copytree(step(run_dir, 4), moved)
    with pytest.raises(UnetsegError, match=r"training checkpoint.*best/ or final/"):
        load_model(moved)
    code, _, err = run_main("evaluate", [moved, "--data", data, "--out", tmp_path / "r.json"], capsys)
    assert code == 1 and str(moved) in err and "Traceback" not in err
    unfinished = tmp_path / "run" / "checkpoints" / "step-00000006.tmp"  # an interrupted save: no trainer_state.json
    unfinished.mkdir(parents=True)
    shutil.copy(step(run_dir, 4) / "model.safetensors", unfinished)
    with pytest.raises(UnetsegError, match=r"step-00000006.tmp.*without a config.yaml.*best/ or final/"):
        load_model(unfinished)
    weightless = tmp_path / "run" / "checkpoints" / "step-00000008"
    weightless.mkdir()
    shutil.copy(step(run_dir, 4) / "trainer_state.json", weightless)
    with pytest.raises(UnetsegError, match=r"step-00000008.*without model.safetensors.*best/ or final/"):
        load_model(weightless)
