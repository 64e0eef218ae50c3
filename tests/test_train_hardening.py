"""Training's hardening (issue 22). What a resume may change, and that it trains with it:
the lr, the schedule and its length, the optimiser's hyperparameters come from the resumed
config at the resumed step; the optimiser's kind and a schedule shorter than the run so far
are refused by name. images/s after a resume that starts with a pending evaluation counts
training only. Batch norm that would see one value per channel is refused at start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_main
from unetseg.optim import lr_at
from unetseg.synth import synth

TINY = ["--batch-size", "4", "--model-width", "8", "--model-depth", "2", "--num-workers", "0",
        "--tracker", "none", "--crop-size", "32", "--log-every", "1", "--eval-every", "4"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data") / "syn"
    synth(folder, train=24, val=4, size="32x32", shard_size=8, workers=1, progress=False)
    return folder


@pytest.fixture(scope="module")
def started(tmp_path_factory, data) -> Path:
    """A finished 8-step run (poly at lr 0.002) with checkpoints at steps 4 and 8."""
    out = tmp_path_factory.mktemp("runs") / "started"
    train(None, data, out, "--max-steps", "8", "--save-every", "4", "--lr", "0.002")
    return out


def train(capsys, data: Path, out: Path, *extra: str, code: int = 0) -> str:
    argv = ["--data", data, "--output-dir", out, *TINY, *extra]
    got, stdout, stderr = run_main("train", argv, capsys or NoCapture())
    assert got == code, stdout[-3000:] + stderr[-3000:]
    return stdout + stderr


class NoCapture:
    """capsys's stand-in where a module-scoped fixture trains: the output stays on the terminal."""

    @staticmethod
    def readouterr():
        return type("Captured", (), {"out": "", "err": ""})


def copy_run(started: Path, tmp_path: Path) -> Path:
    import shutil

    out = tmp_path / "run"
    shutil.copytree(started, out)
    return out


def logged(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def saved_groups(checkpoint: Path) -> list[dict]:
    state = torch.load(checkpoint / "optimizer.bin", map_location="cpu", weights_only=True)
    return state["param_groups"]


def test_a_resume_with_another_lr_and_schedule_trains_with_them(tmp_path, data, started, capsys):
    out = copy_run(started, tmp_path)
    before = logged(out)
    train(capsys, data, out, "--max-steps", "8", "--save-every", "4", "--resume", str(out / "checkpoints/step-00000004"),
          "--lr", "0.02", "--scheduler", "constant", "--weight-decay", "0.05", "--betas", "0.8,0.99")
    after = logged(out)
    assert [after[s]["lr"] for s in (1, 2, 3, 4)] == [before[s]["lr"] for s in (1, 2, 3, 4)]  # kept as they ran
    assert [after[s]["lr"] for s in (5, 6, 7, 8)] == [pytest.approx(0.02)] * 4
    # What the optimiser holds for the next step, not only what was logged.
    groups = {g["name"]: g for g in saved_groups(out / "checkpoints/step-00000008")}
    assert groups["decay"]["lr"] == pytest.approx(0.02) and groups["no_decay"]["lr"] == pytest.approx(0.02)
    assert groups["decay"]["weight_decay"] == 0.05 and groups["no_decay"]["weight_decay"] == 0.0
    assert tuple(groups["decay"]["betas"]) == (0.8, 0.99)


def test_a_finished_run_extended_follows_the_longer_schedule(tmp_path, data, started, capsys):
    out = copy_run(started, tmp_path)
    text = train(capsys, data, out, "--max-steps", "10", "--save-every", "4", "--lr", "0.002", "--resume", "auto")
    assert "already finished" not in text and "final val mIoU" in text
    logs = logged(out)
    for step in (9, 10):  # poly over 10 steps at the step: not the old schedule's 0 past its end
        assert logs[step]["lr"] == pytest.approx(lr_at(step - 1, 0.002, "poly", total_steps=10)) and logs[step]["lr"] > 0
    # Resubmitted as it is now, the extended run is finished.
    assert "already finished at step 10" in train(capsys, data, out, "--max-steps", "10", "--lr", "0.002", "--resume", "auto")


def test_a_resume_refuses_another_optimiser_and_a_schedule_behind_the_run(tmp_path, data, started, capsys):
    out = copy_run(started, tmp_path)
    config = (out / "config.yaml").read_text()
    text = train(capsys, data, out, "--max-steps", "10", "--resume", "auto", "--optimizer", "sgd", code=1)
    assert "optimizer: \"adamw\" when the run started, \"sgd\" now" in text and "--optimizer" in text
    text = train(capsys, data, out, "--max-steps", "6", "--resume", "auto", code=1)
    assert "the run is at step 8, past the --max-steps 6" in text and "Fix:" in text and "Traceback" not in text
    assert (out / "config.yaml").read_text() == config and not list(out.glob("config.resumed-*"))


def test_images_per_second_after_a_pending_evaluation_count_training_only(tmp_path, data, started, capsys, monkeypatch):
    """The evaluation a stop cut short runs first on resume; a clock that jumps a day during it
    must not show in the first window's images/s."""
    import time

    import unetseg.tracking
    import unetseg.validation

    out = copy_run(started, tmp_path)
    state_file = out / "checkpoints/step-00000004/trainer_state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "pending_eval": True}))
    offset = [0.0]
    monkeypatch.setattr(unetseg.tracking.time, "perf_counter", lambda: time.monotonic() + offset[0])
    real_call = unetseg.validation.Validation.__call__

    def slow_evaluation(self):
        result = real_call(self)
        offset[0] += 86400.0
        return result

    monkeypatch.setattr(unetseg.validation.Validation, "__call__", slow_evaluation)
    train(capsys, data, out, "--max-steps", "8", "--save-every", "4", "--lr", "0.002",
          "--resume", str(out / "checkpoints/step-00000004"))
    # A day in the window would give under 4 images / 86400 s; training alone gives far more.
    assert logged(out)[5]["images_per_s"] > 1


@pytest.mark.parametrize("extra", [["--batch-size", "1", "--crop-size", "4"],
                                   ["--batch-size", "1", "--crop-size", "64", "--model-depth", "6"],
                                   ["--batch-size", "1", "--resize", "3,4"]])
def test_batch_norm_with_one_value_per_channel_is_refused_before_the_run_starts(tmp_path, data, capsys, extra):
    out = tmp_path / "run"
    text = train(capsys, data, out, "--max-steps", "2", *extra, code=1)
    assert "one value per channel" in text and "--model-norm group" in text and "Traceback" not in text
    assert not out.exists()


def test_the_smallest_batch_norm_batch_that_works_is_accepted(tmp_path, data, capsys):
    """Two values per channel at the bottleneck train: the check refuses only what would crash."""
    train(capsys, data, tmp_path / "run", "--max-steps", "1", "--batch-size", "1", "--crop-size", "5,4")


def test_a_dataset_without_a_val_split_says_how_to_get_one(tmp_path, data, capsys):
    import shutil

    folder = tmp_path / "noval"
    shutil.copytree(data, folder)
    info = json.loads((folder / "dataset.json").read_text())
    del info["splits"]["val"]
    (folder / "dataset.json").write_text(json.dumps(info))
    text = train(capsys, folder, tmp_path / "run", "--max-steps", "1", code=1)
    assert "no 'val' split to validate on" in text and "--val-data" in text and "--val-fraction" in text
    assert "pick one of those" not in text  # picking train would only fail on the next check


def test_a_resume_reads_past_a_metrics_line_cut_short_by_a_crash(tmp_path, data, started, capsys):
    out = copy_run(started, tmp_path)
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 9, "lo')  # killed mid-write
    train(capsys, data, out, "--max-steps", "10", "--lr", "0.002", "--resume", "auto")
    assert sorted(logged(out)) == list(range(1, 11))


@pytest.mark.parametrize("extra, said, not_said", [
    (["--train-split", ","], "a split name is empty", "named twice"),
    (["--loss", "ce+foo"], "unknown loss 'foo' (registered losses: ce, dice, lovasz, ohem); use e.g. ce", ".."),
])
def test_errors_that_misled_now_say_what_is_wrong(tmp_path, data, capsys, extra, said, not_said):
    text = train(capsys, data, tmp_path / "run", "--max-steps", "1", *extra, code=1)
    assert said in text and not_said not in text and "Fix:" in text


def test_a_seed_beyond_32_bits_is_refused_by_name(tmp_path, data, capsys):
    """derive_seed keeps today's streams for 32-bit parts only; a larger seed would change them."""
    text = train(capsys, data, tmp_path / "run", "--max-steps", "1", "--seed", str(2**32), code=1)
    assert "run.seed (--seed)" in text and "4294967296" in text and not (tmp_path / "run").exists()


def test_cudnn_autotuning_is_on_for_cuda_when_the_shapes_repeat(data, monkeypatch):
    """Issue 23.5: training set cudnn.benchmark nowhere (only benchmarks/gpu.py did)."""
    from types import SimpleNamespace

    from unetseg.config import TrainConfig
    from unetseg.sources import open_source
    from unetseg.train import AUTOTUNE_MAX_EVAL_SIZES, autotune_convolutions

    val = open_source(data, "val")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    config = TrainConfig()
    config.run.compile = "off"
    assert not autotune_convolutions(config, SimpleNamespace(val=val), torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False
    assert autotune_convolutions(config, SimpleNamespace(val=val), torch.device("cuda"))  # one val size
    assert torch.backends.cudnn.benchmark is True
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    split = val.info.splits["val"]
    many = {f"{16 + i}x16": 1 for i in range(AUTOTUNE_MAX_EVAL_SIZES + 1)}
    monkeypatch.setattr(split, "image_sizes", many)
    assert not autotune_convolutions(config, SimpleNamespace(val=val), torch.device("cuda"))  # eager, many sizes
    config.data.eval_resize = [32, 32]
    assert autotune_convolutions(config, SimpleNamespace(val=val), torch.device("cuda"))  # resized: one shape
