"""A real SLURM on this host: `scontrol requeue` in the middle of a run of
launch/slurm_multinode.sbatch makes every rank checkpoint and stop, the job requeues and
resumes with --resume auto, and it ends with the weights of a run that was never
interrupted.

Needs Debian's slurm-wlm and munge and root (slurmd runs jobs as root here):
`make test-slurm` installs them and runs these tests; without them they are skipped.
The test writes its own one-host cluster (munged on its own socket and key, slurmctld
and slurmd on free ports, state under a temporary folder) and stops it afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
from safetensors.torch import load_file

from conftest import REPO, SCRIPT_ENV
from multiproc import free_port
from unetseg.synth import synth

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol")
MISSING = [d for d in DAEMONS if shutil.which(d) is None and shutil.which(d, path="/usr/sbin:/usr/bin") is None]
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(bool(MISSING), reason=f"SLURM is not installed here ({', '.join(MISSING)} missing): "
                       "`make test-slurm` installs slurm-wlm and munge and runs these tests"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the one-host SLURM cluster runs jobs as root: run as root"),
]
SBIN = "/usr/sbin:/usr/bin"
TRAIN = ["--batch-size", "4", "--model-width", "4", "--model-depth", "2", "--num-workers", "0", "--tracker", "none",
         "--crop-size", "32", "--mixed-precision", "no", "--max-steps", "400", "--log-every", "5",
         "--eval-every", "1000", "--save-every", "1000"]


def wait_for(check, timeout: float, what: str, interval: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A one-host SLURM cluster; yields the environment its commands need."""
    root = tmp_path_factory.mktemp("slurm")
    root.chmod(0o700)
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    env = {**SCRIPT_ENV, "SLURM_CONF": str(root / "slurm.conf"), "PATH": f"{SCRIPT_ENV['PATH']}:{SBIN}"}
    subprocess.run(["munged", "--force", f"--socket={root}/munge.sock", f"--key-file={key}",
                    f"--pid-file={root}/munged.pid", f"--log-file={root}/munged.log", f"--seed-file={root}/munge.seed"],
                   check=True, env=env, timeout=30)
    for folder in ("state", "spool"):
        (root / folder).mkdir()
    (root / "slurm.conf").write_text(f"""ClusterName=unetsegtest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire: a requeued job waits this long (default 120 s) before it may start again
AuthInfo=socket={root}/munge.sock,cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=60
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
NodeName={host} CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    daemons = [subprocess.Popen([name, "-D"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True) for name in ("slurmctld", "slurmd")]
    try:
        wait_for(lambda: subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
                 .stdout.strip() == "idle", 60, "the node to be idle in sinfo")
        yield env
    finally:
        subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True)
        for daemon in daemons:
            daemon.terminate()
        for daemon in daemons:
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
        with contextlib.suppress(OSError, ValueError):
            os.kill(int((root / "munged.pid").read_text()), signal.SIGTERM)


def job_field(env: dict, job: str, name: str) -> str | None:
    shown = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    fields = dict(item.split("=", 1) for item in shown.split() if "=" in item)
    return fields.get(name)


def test_requeue_mid_run_checkpoints_resumes_and_ends_as_an_uninterrupted_run(tmp_path, cluster):
    data = tmp_path / "syn"
    synth(data, train=12, val=4, size="32x32", workers=1, progress=False)
    out = tmp_path / "run"
    args = ["--data", str(data), "--output-dir", str(out), *TRAIN, "--resume", "auto"]
    env = {**cluster, "GPUS_PER_NODE": "2", "ACCELERATE_CONFIG": "launch/multinode.yaml",
           "MAIN_PROCESS_PORT": str(free_port())}
    # The script asks for 8 GPUs and 32 CPUs: a CPU node gives none and 2 (GPUS_PER_NODE: 2 gloo ranks).
    submitted = subprocess.run(["sbatch", "--parsable", "--nodes", "1", "--gpus-per-node=0", "--cpus-per-task", "2",
                                "--time", "10", "--requeue", "--output", str(tmp_path / "job-%j.out"),
                                "launch/slurm_multinode.sbatch", *args], cwd=REPO, env=env, capture_output=True,
                               text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 6, 180, "30 steps of training")
    requeue = subprocess.run(["scontrol", "requeue", job], env=env, capture_output=True, text=True)
    assert requeue.returncode == 0, requeue.stderr
    wait_for(lambda: not subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True,
                                        text=True).stdout.strip(), 300, f"job {job} to end", interval=2)
    log = (tmp_path / f"job-{job}.out").read_text()
    assert job_field(env, job, "JobState") == "COMPLETED", log[-4000:]
    assert job_field(env, job, "Restarts") == "1"

    sessions = [json.loads(line) for line in (out / "sessions.jsonl").read_text().splitlines()]
    assert [s["event"] for s in sessions] == ["start", "end", "start", "end"], sessions
    stopped_at = sessions[1]["step"]
    assert sessions[1]["stopped"] and 30 <= stopped_at < 400
    assert sessions[2]["resumed_from"].endswith(f"step-{stopped_at:08d}") and sessions[2]["step"] == stopped_at
    assert sessions[3] == {**sessions[3], "step": 400, "stopped": False}
    assert f"resuming from {out / 'checkpoints' / f'step-{stopped_at:08d}'} at step {stopped_at}" in log

    # The same training, never interrupted, outside SLURM: the same weights, bit for bit.
    reference = tmp_path / "reference"
    plain = subprocess.run(["accelerate", "launch", "--config_file", "launch/multinode.yaml", "--num_machines", "1",
                            "--machine_rank", "0", "--num_processes", "2", "--main_process_ip", "127.0.0.1",
                            "--main_process_port", str(free_port()), "-m", "unetseg.train", "--data", str(data),
                            "--output-dir", str(reference), *TRAIN], cwd=REPO, env=SCRIPT_ENV, capture_output=True,
                           text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr[-3000:]
    ours, theirs = load_file(out / "final" / "model.safetensors"), load_file(reference / "final" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(ours[k].equal(theirs[k]) for k in ours)
