"""Training end to end on tiny synthetic data: run dir, DDP, exact resume, schedule, W&B offline."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from multiproc import run_distributed
from unetseg.checkpoint import latest_checkpoint, list_checkpoints, load_model, save_model
from unetseg.optim import lr_at
from unetseg.synth import synth

TINY = ["--batch-size", "4", "--model-width", "8", "--model-depth", "2", "--num-workers", "0",
        "--tracker", "none", "--lr", "0.005", "--crop-size", "32"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data") / "syn"
    synth(folder, train=24, val=7, size="32x32", shard_size=8, workers=1, progress=False)
    return folder


def train_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "unetseg.train", "--data", str(data), "--output-dir", str(out), *TINY, *extra]


def run(cmd: list[str], env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}  # None: unset it
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r], [r for r in lines if "mIoU" in r]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_single_process_learns_and_writes_the_run_dir(tmp_path, data):
    out = tmp_path / "run"
    result = run(train_cmd(data, out, "--max-steps", "40", "--log-every", "5", "--eval-every", "20",
                           "--keep-checkpoints", "1", "--warmup-steps", "3"))
    assert "final val mIoU" in result.stdout and "parameters" in result.stdout
    logs, evals = metrics(out)
    assert [r["step"] for r in logs] == list(range(5, 41, 5))
    assert all({"step", "epoch", "lr", "loss", "images_per_s"} <= set(r) for r in logs)
    assert logs[-1]["loss"] < logs[0]["loss"] * 0.85, [r["loss"] for r in logs]
    assert [r["step"] for r in evals] == [20, 40]
    assert {"mIoU", "pixel_accuracy", "mean_accuracy", "fwIoU", "per_class", "num_samples"} <= set(evals[-1])
    assert evals[-1]["num_samples"] == 7
    # The lr each step used is the closed form of the schedule at that step.
    for r in logs:
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, 0.005, "poly", total_steps=40, warmup_steps=3))
    for name in ("config.yaml", "dataset.json", "metrics.jsonl"):
        assert (out / name).is_file()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000040"]  # keep 1
    for folder in ("best", "final"):
        assert sorted(p.name for p in (out / folder).iterdir()) == ["config.yaml", "dataset.json", "model.safetensors"]
    model, config, info = load_model(out)
    assert config["run"]["max_steps"] == 40 and info.num_classes == 10
    assert model.config.width == 8
    # Starting again in the same run dir without --resume would mix two runs.
    again = subprocess.run(train_cmd(data, out, "--max-steps", "2"), capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and "--resume auto" in again.stderr and "Traceback" not in again.stderr


def test_bf16_channels_last_on_the_cpu_learns(tmp_path, data):
    out = tmp_path / "run"
    result = run(train_cmd(data, out, "--max-steps", "40", "--log-every", "5", "--eval-every", "40",
                           "--warmup-steps", "3", "--mixed-precision", "bf16", "--channels-last", "on"))
    assert "on cpu, mixed precision bf16, channels_last, augmentation in loader workers;" in result.stdout
    logs, evals = metrics(out)
    assert logs[-1]["loss"] < logs[0]["loss"] * 0.85, [r["loss"] for r in logs]
    assert evals[-1]["num_samples"] == 7
    # The saved weights are plain fp32 tensors that load into a default model.
    assert all(t.dtype == torch.float32 for t in weights(out / "final").values() if t.is_floating_point())
    model, _, _ = load_model(out)
    assert torch.isfinite(model(torch.randn(1, 3, 32, 32))).all()


@pytest.mark.multiprocess
def test_two_processes_agree_and_eval_equals_one_process(tmp_path, data):
    out = tmp_path / "ddp"
    args = [str(REPO / "tests" / "scripts" / "train_worker.py"), str(tmp_path),
            "--data", str(data), "--output-dir", str(out), *TINY, "--max-steps", "6", "--log-every", "1",
            "--grad-accum", "2"]
    run_distributed(args, nproc=2, launcher="accelerate", timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["params"] == ranks[1]["params"]  # DDP kept the replicas identical (no_sync included)
    assert ranks[0]["buffers"] == ranks[1]["buffers"]  # averaged before the final evaluation
    assert len(ranks[0]["keys"]) == len(ranks[1]["keys"]) == 12  # 6 steps x 2 accumulated micro-batches
    assert ranks[0]["keys"] != ranks[1]["keys"]  # the ranks drew different batches
    logs, evals = metrics(out)
    for r in logs:  # one schedule step per optimiser step, with two processes too
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, 0.005, "poly", total_steps=6))
    # The distributed evaluation equals a one-process evaluation of the saved weights.
    from unetseg.scoring import confusion_matrix
    from unetseg.badsamples import StreamStats
    from unetseg.sources import open_source
    from unetseg.loaders import iterate, make_loader
    from unetseg.stream import EvalStream
    from unetseg.transforms import EvalTransform, EvalTransformConfig

    model, _, info = load_model(out / "final")
    source = open_source(data, "val")
    cm, _ = confusion_matrix(model, iterate(make_loader(EvalStream(source, EvalTransform(EvalTransformConfig()), 3)), StreamStats()),
                             info.num_classes, info.classes.ignore_index, info.classes.names)
    single = cm.compute().to_dict()
    assert evals[-1]["confusion_matrix"] == single["confusion_matrix"]
    assert evals[-1]["mIoU"] == single["mIoU"] and evals[-1]["num_samples"] == 7


def test_sigterm_then_resume_auto_matches_a_straight_run(tmp_path, data):
    common = ["--max-steps", "30", "--log-every", "1", "--save-every", "10", "--eval-every", "15", "--model-dropout", "0.1"]
    straight = tmp_path / "straight"
    run(train_cmd(data, straight, *common))
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen(train_cmd(data, stopped, *common), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline:
        path = stopped / "metrics.jsonl"
        if path.is_file() and len(path.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    logs, _ = metrics(stopped)
    k = logs[-1]["step"]
    assert k < 30, "the run finished before the signal; the test needs a slower run"
    assert latest_checkpoint(stopped).name == f"step-{k:08d}" and "stopped by SIGTERM" in output
    run(train_cmd(data, stopped, *common, "--resume", "auto"))
    a, b = weights(straight / "final"), weights(stopped / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    logs, evals = metrics(stopped)
    assert [r["step"] for r in logs] == list(range(1, 31))  # no gap, no repeat
    straight_logs, straight_evals = metrics(straight)
    assert [(r["loss"], r["lr"]) for r in logs] == [(r["loss"], r["lr"]) for r in straight_logs]
    assert [r["confusion_matrix"] for r in evals] == [r["confusion_matrix"] for r in straight_evals]


@pytest.mark.multiprocess
def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step(tmp_path, data):
    from multiproc import launch_command

    out = tmp_path / "ddp"
    args = [str(REPO / "tests" / "scripts" / "train_worker.py"), str(tmp_path), "--data", str(data),
            "--output-dir", str(out), *TINY, "--max-steps", "40", "--log-every", "1", "--save-every", "100"]
    log = tmp_path / "log.txt"
    # Output to a file, not a pipe: a worker left behind by a failure must not hold the test.
    with log.open("w") as sink:
        proc = subprocess.Popen(launch_command(args, nproc=2, launcher="accelerate"), stdout=sink,
                                stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((out / "metrics.jsonl").is_file()
                                              and len((out / "metrics.jsonl").read_text().splitlines()) >= 2):
            time.sleep(0.05)
        os.kill(int((tmp_path / "pid1").read_text()), signal.SIGTERM)  # rank 1 only
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            for rank in (0, 1):
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int((tmp_path / f"pid{rank}").read_text()), signal.SIGKILL)
    output = log.read_text()
    assert proc.returncode == 0, output[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    k = metrics(out)[0][-1]["step"]
    assert k < 40 and len(ranks[0]["keys"]) == len(ranks[1]["keys"]) == k  # both stopped after step k
    assert ranks[0]["params"] == ranks[1]["params"]
    assert latest_checkpoint(out).name == f"step-{k:08d}"
    assert "stopped by a signal on another rank" in output or "stopped by SIGTERM" in output


def test_nonfinite_losses_stop_the_run_with_a_clear_message(tmp_path, data):
    cmd = train_cmd(data, tmp_path / "run", "--max-steps", "30", "--optimizer", "sgd", "--max-nonfinite", "3")
    cmd[cmd.index("--lr") + 1] = "1e30"
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1
    # Counted on the device and read when the loop logs: the streak is at least the limit by then.
    assert re.search(r"warning: non-finite loss in \d+ of the \d+ steps up to step \d+, each skipped", result.stdout)
    found = re.search(r"(\d+) non-finite losses in a row \(steps (\d+) to (\d+)\)", result.stderr)
    assert found and int(found[1]) >= 3 and int(found[3]) - int(found[2]) + 1 == int(found[1]), result.stderr[-2000:]
    assert "Fix: lower --lr" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_interrupted_checkpoint_is_never_resumed_from(tmp_path, data):
    out = tmp_path / "run"
    run(train_cmd(data, out, "--max-steps", "4", "--save-every", "2", "--keep-checkpoints", "3"))
    good = latest_checkpoint(out)
    assert good.name == "step-00000004"
    # A write cut short: the temporary folder, and a folder with the final name but no state file.
    (out / "checkpoints" / "step-00000006.tmp").mkdir()
    (out / "checkpoints" / "step-00000008").mkdir()
    assert latest_checkpoint(out) == good
    result = run(train_cmd(data, out, "--max-steps", "6", "--save-every", "2", "--resume", "auto"))
    assert "resuming from" in result.stdout and "step-00000004" in result.stdout
    assert not (out / "checkpoints" / "step-00000006.tmp").exists()  # swept by the next save


def test_wandb_offline_without_credentials(tmp_path, data):
    out = tmp_path / "run"
    env = {"HOME": str(tmp_path), "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_API_KEY": None, "WANDB_MODE": None}
    cmd = train_cmd(data, out, "--max-steps", "4", "--eval-every", "2", "--log-every", "1")
    cmd[cmd.index("--tracker") + 1] = "wandb"
    run(cmd, env=env)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (record_file,) = runs[0].glob("run-*.wandb")
    content = record_file.read_bytes()
    for key in (b"loss", b"lr", b"images_per_s", b"val/mIoU", b"val/iou/background", b"val/predictions"):
        assert key in content, key
    log = (out / "wandb" / "debug-internal.log").read_text()
    assert "127.0.0.1:9" not in log


def test_save_model_replaces_whole(tmp_path, data):
    from unetseg.dataset import DatasetInfo
    from unetseg.models.unet import UNet, UNetConfig

    info = DatasetInfo.load(data)
    net = UNet(UNetConfig(num_classes=10, width=4, depth=1))
    config = {"unet": net.config.to_dict()}
    save_model(tmp_path / "best", net, config, info)
    torch.nn.init.zeros_(next(net.parameters()))
    save_model(tmp_path / "best", net, config, info)
    model, _, _ = load_model(tmp_path / "best")
    assert torch.equal(next(model.parameters()), next(net.parameters()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


# --- hardening: each test fails on 3b55f7d ------------------------------------------------


def worker_cmd(out_dir: Path, data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "tests" / "scripts" / "train_worker.py"), str(out_dir), "--data", str(data),
            "--output-dir", str(run_dir), *TINY, *extra]


def fails(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert result.returncode == 1, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result


def test_a_dataset_without_ignore_index_trains_with_padded_crops(tmp_path):
    """Crops larger than the image pad the mask; without an ignore index the padding must
    still be left out of the loss (cross-entropy and Dice) and the metrics."""
    from conftest import make_folders, write_classes
    from unetseg.pack import pack

    make_folders(tmp_path, {"train": 8, "val": 3}, size=(24, 32), num_classes=3, ignore=None)
    classes = write_classes(tmp_path / "classes.json", names=["a", "b", "c"], palette=[[0, 0, 0], [9, 9, 9], [99, 9, 9]],
                            ignore_index=None)
    pack(tmp_path / "images", tmp_path / "masks", classes, tmp_path / "shards", workers=1, progress=False)
    out = tmp_path / "run"
    run(train_cmd(tmp_path / "shards", out, "--max-steps", "4", "--eval-every", "4", "--loss", "ce+dice"))  # crops 32x32
    logs, evals = metrics(out)
    assert all(r["loss"] == r["loss"] and r["loss"] < 1e3 for r in logs)  # finite
    assert evals[-1]["num_samples"] == 3 and evals[-1]["num_pixels"] == 3 * 24 * 32  # every real pixel, no padding


def test_a_shard_pattern_trains_and_validates_on_the_val_split(tmp_path, data):
    out = tmp_path / "run"
    pattern = f"{data}/train-{{000000..000002}}.tar"
    run(train_cmd(pattern, out, "--max-steps", "4", "--eval-every", "2"))
    _, evals = metrics(out)
    assert [r["num_samples"] for r in evals] == [7, 7]  # the val split's 7 samples, not the 24 training ones
    # The validation split never comes from the training shards.
    result = fails(train_cmd(pattern, tmp_path / "bad", "--val-data", pattern, "--max-steps", "2"))
    assert "train-000000.tar (train)" in result.stderr and "another split than 'val'" in result.stderr
    result = fails(train_cmd(f"{data}/val-000000.tar", tmp_path / "bad2", "--max-steps", "2"))
    assert "val-000000.tar (val)" in result.stderr and "'train'" in result.stderr


def test_stops_during_evaluation_and_on_the_last_step_resume_to_the_straight_run(tmp_path, data):
    """A stop that arrives during an evaluation does not wait for it: the run checkpoints
    and exits 0, and resume runs that evaluation first. A stop on the last step still ends
    with final/, and resuming a finished run says so and exits 0."""
    common = ["--max-steps", "12", "--eval-every", "6", "--log-every", "1", "--model-dropout", "0.1",
              "--eval-batch-size", "2"]
    straight = tmp_path / "straight"
    run(train_cmd(data, straight, *common))
    out = tmp_path / "stopped"
    first = run(worker_cmd(tmp_path, data, out, *common), env={"SIGTERM_IN_EVAL": "1"})  # the eval at step 6
    assert "stopped by SIGTERM at step 6" in first.stdout
    assert json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())["pending_eval"] is True
    assert metrics(out)[1] == []  # the cut evaluation left no record
    second = run(worker_cmd(tmp_path, data, out, *common, "--resume", "auto"), env={"SIGTERM_IN_EVAL": "2"})
    assert "stopped by SIGTERM at step 12" in second.stdout and not (out / "final").exists()
    third = run(train_cmd(data, out, *common, "--resume", "auto"))
    assert "final val mIoU" in third.stdout and (out / "final" / "model.safetensors").is_file()
    a, b = weights(straight / "final"), weights(out / "final")
    assert all(torch.equal(a[n], b[n]) for n in a)
    logs, evals = metrics(out)
    straight_logs, straight_evals = metrics(straight)
    assert [r["step"] for r in evals] == [6, 12]
    assert [r["confusion_matrix"] for r in evals] == [r["confusion_matrix"] for r in straight_evals]
    assert [(r["step"], r["loss"]) for r in logs] == [(r["step"], r["loss"]) for r in straight_logs]
    # The resubmit flow: resuming the finished run changes nothing.
    again = run(train_cmd(data, out, *common, "--resume", "auto"))
    assert "already finished at step 12" in again.stdout
    assert metrics(out) == (logs, evals)


def test_resume_refuses_another_setup_and_keeps_the_original_config(tmp_path, data, capsys):
    from conftest import run_main

    out = tmp_path / "run"
    run(train_cmd(data, out, "--max-steps", "4", "--save-every", "2"))
    original = (out / "config.yaml").read_text()
    for extra, named in ((["--batch-size", "2"], "batch_size: 4 when the run started, 2 now"),
                         (["--num-workers", "1"], "num_workers: 0 when the run started, 1 now"),
                         (["--data", f"{data}/train-{{000000..000001}}.tar"], "train_shards")):
        code, _, err = run_main("train", train_cmd(data, out, "--max-steps", "6", "--resume", "auto", *extra)[3:], capsys)
        assert code == 1 and named in err and "Fix:" in err
    assert (out / "config.yaml").read_text() == original
    # What the data order does not depend on may change: the original config stays, the new one lands beside it.
    run(train_cmd(data, out, "--max-steps", "6", "--resume", "auto", "--lr", "0.001"))
    assert (out / "config.yaml").read_text() == original
    resumed = (out / "config.resumed-step-00000004.yaml").read_text()
    assert "lr: 0.001" in resumed and "max_steps: 6" in resumed


def test_one_unreadable_sample_is_counted_once_over_many_epochs(tmp_path, data):
    from conftest import corrupt

    shutil.copytree(data, tmp_path / "data")
    key = corrupt(tmp_path / "data", "train-000000.tar", 3)
    out = tmp_path / "run"
    # 8 epochs of 6 steps, two loader workers: the sample is read about 16 times.
    cmd = train_cmd(tmp_path / "data", out, "--epochs", "8", "--max-bad-samples", "1", "--eval-every", "48",
                    "--log-every", "48")
    cmd[cmd.index("--num-workers") + 1] = "2"
    result = run(cmd)
    assert "1 bad training samples skipped so far" in result.stdout and key is not None
    _, evals = metrics(out)
    assert evals[-1]["step"] == 48 and evals[-1]["bad_samples"] == 1


@pytest.mark.multiprocess
def test_sync_bn_on_cpu_processes_is_refused_at_start(tmp_path, data):
    from multiproc import launch_command

    cmd = launch_command(["-m", "unetseg.train", "--data", str(data), "--output-dir", str(tmp_path / "run"), *TINY,
                          "--max-steps", "2", "--sync-bn"], nproc=2, launcher="accelerate")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert "--sync-bn: SyncBatchNorm runs on GPUs only" in result.stderr and "--model-norm group" in result.stderr
    assert "ValueError: SyncBatchNorm" not in result.stderr and not (tmp_path / "run").exists()


@pytest.mark.multiprocess
def test_two_processes_seed_per_rank_count_bad_samples_globally_and_resume_where_rank_0_says(tmp_path, data):
    from conftest import corrupt

    shutil.copytree(data, tmp_path / "data")
    bad_key = corrupt(tmp_path / "data", "val-000000.tar", 0)  # the first val sample: rank 0's share
    out = tmp_path / "run"
    args = [str(REPO / "tests" / "scripts" / "train_worker.py"), str(tmp_path), "--data", str(tmp_path / "data"),
            "--output-dir", str(out), *TINY, "--max-steps", "4", "--save-every", "2", "--eval-every", "4",
            "--model-dropout", "0.3", "--keep-checkpoints", "2"]
    first = run_distributed(args, nproc=2, launcher="accelerate", timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # The same initial weights on every rank, but each rank its own dropout masks.
    assert ranks[0]["first_forward"]["params"] == ranks[1]["first_forward"]["params"]
    assert ranks[0]["first_forward"]["rng"] != ranks[1]["first_forward"]["rng"]
    # One sample of 7 unreadable, found by rank 0: the count and the warning are global.
    _, evals = metrics(out)
    assert evals[-1]["num_samples"] == 6 and evals[-1]["val_bad_samples"] == 1
    assert "val mIoU over 6 of the split's 7 samples (1 could not be read" in first.stdout + first.stderr
    assert bad_key in first.stdout + first.stderr
    # Resume while rank 1 sees a stale listing (only step 2): rank 0's choice, step 4, wins on both.
    assert [p.name for _, p in list_checkpoints(out)] == ["step-00000002", "step-00000004"]
    resumed = run_distributed([*args[:-8], "--max-steps", "6", "--save-every", "2", "--eval-every", "6",
                               "--model-dropout", "0.3", "--resume", "auto"],
                              nproc=2, launcher="accelerate", timeout=300, env={"STALE_CHECKPOINT_VIEW_RANK": "1"})
    assert "resuming from" in resumed.stdout and "step-00000004 at step 4" in resumed.stdout
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]["keys"]) == len(ranks[1]["keys"]) == 2 and ranks[0]["params"] == ranks[1]["params"]
    # Another world size would continue on other data: refused.
    result = fails([sys.executable, "-m", "unetseg.train", *args[2:-8], "--max-steps", "8", "--save-every", "2",
                    "--eval-every", "6", "--model-dropout", "0.3", "--resume", "auto"])
    assert "world_size: 2 when the run started, 1 now" in result.stderr


def test_compile_on_trains_and_validates_as_eager_with_one_graph_each(tmp_path, data, capsys, monkeypatch):
    """`--compile on`, with torch.compile's graphs run eagerly (dynamo only, no inductor:
    seconds on a CPU): the run gives the numbers of an uncompiled one, and validation,
    whose batches are padded to one shape, compiles once however its batches end."""
    import functools

    from torch._dynamo.testing import CompileCounter

    from conftest import run_main

    counter = CompileCounter()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counter))
    common = ["--data", data, *TINY, "--max-steps", "6", "--eval-every", "3", "--eval-batch-size", "4"]
    code, out, err = run_main("train", [*common, "--output-dir", tmp_path / "compiled", "--compile", "on"], capsys)
    assert code == 0, err
    assert "compiled" in out
    assert counter.frame_count == 2  # the training graph, and validation's over 7 samples in batches of 4 and 3
    code, out, err = run_main("train", [*common, "--output-dir", tmp_path / "eager", "--compile", "off"], capsys)
    assert code == 0, err
    def numbers(run_dir):
        logs, evals = metrics(run_dir)
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in logs], evals

    assert numbers(tmp_path / "compiled") == numbers(tmp_path / "eager")


def test_augmentation_on_the_device_trains_as_augmentation_in_workers(tmp_path, data, capsys):
    """`--augment-on device` on the CPU: workers only decode, the batch hook augments, and
    the run follows the one augmented in workers (fp32: to float rounding)."""
    from conftest import run_main

    common = ["--data", data, *TINY, "--num-workers", "1", "--max-steps", "6", "--log-every", "1",
              "--eval-every", "6", "--jitter", "0.3"]
    code, out, err = run_main("train", [*common, "--output-dir", tmp_path / "device", "--augment-on", "device"], capsys)
    assert code == 0, err
    assert "augmentation on cpu;" in out
    code, out, err = run_main("train", [*common, "--output-dir", tmp_path / "workers", "--augment-on", "workers"], capsys)
    assert code == 0, err
    assert "augmentation in loader workers;" in out
    (device_logs, device_evals), (worker_logs, worker_evals) = metrics(tmp_path / "device"), metrics(tmp_path / "workers")
    assert [r["loss"] for r in device_logs] == pytest.approx([r["loss"] for r in worker_logs], rel=1e-4)
    assert device_evals[-1]["mIoU"] == pytest.approx(worker_evals[-1]["mIoU"], abs=1e-3)
    a, b = weights(tmp_path / "device" / "final"), weights(tmp_path / "workers" / "final")
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_lovasz_and_ohem_losses_train_with_their_settings(tmp_path, data, capsys):
    from conftest import run_main

    code, out, err = run_main("train", ["--data", data, *TINY, "--max-steps", "4", "--log-every", "2", "--eval-every", "4",
                                        "--loss", "ohem+0.5*lovasz", "--ohem-threshold", "0.9", "--ohem-min-kept", "0.2",
                                        "--output-dir", tmp_path / "run"], capsys)
    assert code == 0, err
    logs, evals = metrics(tmp_path / "run")
    assert all(0 < r["loss"] < 10 for r in logs) and evals
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "loss: ohem+0.5*lovasz" in saved and "ohem_threshold: 0.9" in saved and "ohem_min_kept: 0.2" in saved


def test_training_on_train_and_val_reads_both(tmp_path, data, capsys):
    """The final model's run: an epoch covers both splits (24 + 7 samples, batch 4: 7 steps)."""
    from conftest import run_main

    code, out, err = run_main("train", ["--data", data, *TINY, "--max-steps", "2", "--eval-every", "2",
                                        "--train-split", "train,val", "--output-dir", tmp_path / "run"], capsys)
    assert code == 0, err
    assert "(7 per epoch)" in out and "not a held-out measure" in out


def test_a_failed_set_up_still_ends_the_process_group(tmp_path, data, capsys, monkeypatch):
    """An error after the accelerator exists (here: an unknown split) must end the process
    group, or gloo aborts the processes at exit ("terminate called without an active
    exception")."""
    from accelerate import PartialState

    from conftest import run_main

    ended = []
    real = PartialState.destroy_process_group
    monkeypatch.setattr(PartialState, "destroy_process_group", lambda self, *a: ended.append(1) or real(self, *a))
    code, _, err = run_main("train", ["--data", data, *TINY, "--train-split", "nosuch", "--output-dir", tmp_path / "r"],
                            capsys)
    assert code != 0 and "no split 'nosuch'" in err
    assert ended
