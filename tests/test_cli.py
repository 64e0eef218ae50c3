"""The ``unetseg`` command: ``unetseg train`` and ``python -m unetseg.train`` are one
program with one help text."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import SCRIPT_ENV


def help_text(cmd: list[str]) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=SCRIPT_ENV)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_train_help_is_the_same_through_both_entry_points():
    unetseg = str(Path(sys.executable).parent / "unetseg")
    via_cli = help_text([unetseg, "train", "--help"])
    via_module = help_text([sys.executable, "-m", "unetseg.train", "--help"])
    assert via_cli == via_module
    assert "usage: unetseg train" in via_cli and "--model-width VALUE" in via_cli and "Default: 16." in via_cli


def test_evaluate_help_is_the_same_through_both_entry_points():
    unetseg = str(Path(sys.executable).parent / "unetseg")
    assert help_text([unetseg, "evaluate", "--help"]) == help_text([sys.executable, "-m", "unetseg.evaluate", "--help"])
