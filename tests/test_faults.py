"""Faults a cluster deals out, with real processes: a rank killed mid-run under an elastic
launcher, a kill in the middle of a checkpoint write, and a disk that fills up at
checkpoint time. Each run must end with the model an uninterrupted run ends with, or stop
with a message that names the path, leaving the previous checkpoint whole."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import REPO, run_main
from multiproc import _descendants, free_port, run_distributed
from unetseg.checkpoint import list_checkpoints
from unetseg.synth import synth

WORKER = str(REPO / "tests" / "scripts" / "train_worker.py")
TINY = ["--batch-size", "4", "--model-width", "4", "--model-depth", "2", "--num-workers", "0", "--tracker", "none",
        "--crop-size", "32", "--mixed-precision", "no", "--lr", "0.005"]
STEPS = ["--max-steps", "24", "--save-every", "4", "--eval-every", "24", "--log-every", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("faults") / "syn"
    synth(folder, train=24, val=4, size="32x32", shard_size=8, workers=1, progress=False)
    return folder


def weights(run_dir: Path) -> dict:
    return load_file(run_dir / "final" / "model.safetensors")


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data) -> Path:
    """Two processes, no fault: the weights every faulty run must end with."""
    out = tmp_path_factory.mktemp("straight")
    run_distributed([WORKER, str(out), "--data", str(data), "--output-dir", str(out / "run"), *TINY, *STEPS,
                     "--resume", "auto"], nproc=2, timeout=300)
    return out / "run"


def elastic(out: Path, data: Path, env: dict) -> subprocess.Popen:
    """torchrun with one restart allowed, as a cluster job would run it."""
    # The c10d rendezvous, as on a cluster, with a store of its own for each attempt: with a
    # store shared across attempts (torchrun's default), a restarted rank may read its
    # peer's address from the attempt before and fail to connect (pytorch issue 135712).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--max-restarts", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "faults",
           WORKER, str(out), "--data", str(data), "--output-dir", str(out / "run"), *TINY, *STEPS, "--resume", "auto"]
    log = (out / "log.txt").open("w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                                 "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **env})


def finish(proc: subprocess.Popen, out: Path) -> str:
    try:
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            for pid, _ in _descendants(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.kill()
    text = (out / "log.txt").read_text()
    assert proc.returncode == 0, text[-4000:]
    return text


def wait_for(condition, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.multiprocess
def test_a_rank_killed_mid_run_is_restarted_and_ends_with_the_uninterrupted_weights(tmp_path, data, straight):
    proc = elastic(tmp_path, data, {})
    try:
        wait_for(lambda: logged_steps(tmp_path / "run") >= 10)
        os.kill(int((tmp_path / "pid1").read_text()), signal.SIGKILL)  # rank 1, as the OOM killer would
    finally:
        text = finish(proc, tmp_path)
    assert "resuming from" in text  # the restarted group took the newest checkpoint
    assert same_weights(weights(tmp_path / "run"), weights(straight))


@pytest.mark.multiprocess
def test_killed_while_saving_resumes_from_the_checkpoint_before(tmp_path, data, straight):
    marker = tmp_path / "saving"
    proc = elastic(tmp_path, data, {"SLOW_SAVE": str(marker)})
    try:
        wait_for(marker.exists)  # a rank is in the middle of writing the step-4 checkpoint
        time.sleep(0.2)
        assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-00000004.tmp"]
        os.kill(int(marker.read_text()), signal.SIGKILL)
    finally:
        text = finish(proc, tmp_path)
    assert "resuming from" not in text.split("Sending process")[0]  # the first attempt had nothing to resume
    assert same_weights(weights(tmp_path / "run"), weights(straight))
    assert not list((tmp_path / "run" / "checkpoints").glob("*.tmp"))


def test_a_full_disk_at_checkpoint_time_names_the_path_and_keeps_the_previous_one(tmp_path, data, capsys, monkeypatch):
    import errno

    import accelerate

    args = ["--data", data, *TINY, "--max-steps", "6", "--save-every", "2", "--eval-every", "6", "--output-dir",
            tmp_path / "run"]
    code, _, err = run_main("train", [*args[:-1], tmp_path / "straight"], capsys)
    assert code == 0, err
    original = accelerate.Accelerator.save_state

    def full_disk(self, output_dir=None, **kw):
        if Path(output_dir).name.startswith("step-00000004"):
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "partial").write_bytes(b"x")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), output_dir)
        return original(self, output_dir, **kw)

    monkeypatch.setattr(accelerate.Accelerator, "save_state", full_disk)
    code, _, err = run_main("train", args, capsys)
    assert code != 0
    assert "cannot write checkpoint" in err and "step-00000004" in err and "No space left on device" in err
    assert "step-00000002 is intact" in err and "--resume auto" in err
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [2]
    assert not list((tmp_path / "run" / "checkpoints").glob("*.tmp"))
    monkeypatch.setattr(accelerate.Accelerator, "save_state", original)  # space freed: continue
    code, _, err = run_main("train", [*args, "--resume", "auto"], capsys)
    assert code == 0, err
    assert same_weights(weights(tmp_path / "run"), weights(tmp_path / "straight"))


@pytest.mark.multiprocess
def test_one_rank_failing_to_write_its_part_stops_every_rank(tmp_path, data):
    out = tmp_path / "run"
    result = run_distributed([WORKER, str(tmp_path), "--data", str(data), "--output-dir", str(out), *TINY, *STEPS],
                             nproc=2, timeout=240, env={"FAIL_SAVE": "1:8"}, launcher="accelerate", check=False)
    assert result.returncode != 0
    assert result.stderr.count("cannot write checkpoint") >= 2  # each rank says it, none waits forever
    assert "step-00000004 is intact" in result.stderr
    assert [step for step, _ in list_checkpoints(out)] == [4, ]  # keep_checkpoints 2: only 4 was complete
    assert not list((out / "checkpoints").glob("*.tmp"))


@pytest.mark.multiprocess
def test_two_machines_on_one_host_train_as_one_machine_with_two_processes(tmp_path, data, straight):
    """Two `accelerate launch` with launch/multinode.yaml, --num_machines 2 and one process
    each (the multi-node path and its environment, for real) end with the weights and the
    validation confusion matrix of one launcher running two processes."""
    import json

    port = str(free_port())
    procs = []
    for machine in (0, 1):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / "multinode.yaml"),
               "--num_machines", "2", "--machine_rank", str(machine), "--num_processes", "2", "--mixed_precision", "no",
               "--main_process_ip", "127.0.0.1", "--main_process_port", port,
               WORKER, str(tmp_path), "--data", str(data), "--output-dir", str(tmp_path / "run"), *TINY, *STEPS,
               "--resume", "auto"]
        log = (tmp_path / f"machine{machine}.txt").open("w")
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"}))
    try:
        for proc in procs:
            proc.wait(timeout=240)
    finally:
        for proc in procs:
            if proc.poll() is None:
                for pid, _ in _descendants(proc.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                proc.kill()
    for machine, proc in enumerate(procs):
        assert proc.returncode == 0, (tmp_path / f"machine{machine}.txt").read_text()[-4000:]
    assert "2 process(es) on cpu" in (tmp_path / "machine0.txt").read_text()
    assert same_weights(weights(tmp_path / "run"), weights(straight))

    def matrix(run_dir):
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r["confusion_matrix"] for r in rows if "confusion_matrix" in r][-1]

    assert matrix(tmp_path / "run") == matrix(straight)
