"""The training step as a GPU sees it (issue 23): how often it makes the host wait for the
device, how a non-finite loss is skipped without a wait, and how many graphs a compiled
run builds. Counted on the CPU: a host read of a tensor's value is
``aten._local_scalar_dense`` whatever the device (tests/scripts/train_worker.py counts it
per step)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO
from multiproc import run_distributed
from unetseg.synth import synth

WORKER = str(REPO / "tests" / "scripts" / "train_worker.py")
TINY = ["--batch-size", "4", "--model-width", "4", "--model-depth", "2", "--num-workers", "0", "--tracker", "none",
        "--crop-size", "32", "--lr", "0.005"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data") / "syn"
    synth(folder, train=24, val=4, size="48x48", shard_size=8, workers=1, progress=False)
    return folder


def one_process(tmp_path: Path, data: Path, *extra: str, env: dict | None = None) -> tuple[dict, str]:
    cmd = [sys.executable, WORKER, str(tmp_path), "--data", str(data), "--output-dir", str(tmp_path / "run"), *TINY, *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((tmp_path / "rank0.json").read_text()), result.stdout


def test_one_process_steps_without_waiting_for_the_device(tmp_path, data):
    ranks, _ = one_process(tmp_path, data, "--max-steps", "5", "--grad-accum", "2", "--log-every", "100",
                           "--grad-clip", "1.0")
    assert ranks["syncs"] == [0] * 5


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_a_non_finite_loss_skips_the_step_on_the_device(tmp_path, data, optimizer):
    ranks, out = one_process(tmp_path, data, "--max-steps", "1", "--optimizer", optimizer,
                             env={"NAN_LOSS": "0:1"})
    assert ranks["syncs"] == [0]
    # The one step was skipped: the weights are those of the first forward, not NaN.
    assert ranks["params"] == ranks["first_forward"]["params"]
    assert "non-finite loss in 1 of the 1 steps up to step 1, each skipped (1 in a row now" in out


@pytest.mark.multiprocess
def test_two_processes_sync_once_per_step_and_skip_one_ranks_non_finite_loss_together(tmp_path, data):
    out = tmp_path / "ddp"
    args = [WORKER, str(tmp_path), "--data", str(data), "--output-dir", str(out), *TINY, "--max-steps", "4",
            "--grad-accum", "2", "--log-every", "100", "--eval-every", "4"]
    # Rank 1's seventh micro-batch (the first of step 4) is NaN: both ranks skip step 4, and neither hangs.
    result = run_distributed(args, nproc=2, launcher="accelerate", timeout=300, env={"NAN_LOSS": "1:7"})
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["syncs"] == ranks[1]["syncs"] == [1] * 4  # the agreement, read once per optimiser step
    assert ranks[0]["params"] == ranks[1]["params"]
    assert "non-finite loss in 1 of the 4 steps up to step 4, each skipped (1 in a row now" in result.stdout
    state = json.loads((out / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert state["nonfinite_streak"] == 1  # the streak the device counted, as the checkpoint records it


def test_training_and_validation_compile_one_static_graph_each(tmp_path, data, monkeypatch, capsys):
    """Crops of 32 for training, whole 48x48 images for validation: with dynamic shapes the
    second graph would mark the height and width symbolic."""
    from conftest import run_main

    graphs: list[list[tuple]] = []

    def backend(gm, example_inputs):
        values = [node.meta.get("example_value") for node in gm.graph.nodes if node.op == "placeholder"]
        symbolic = [v for v in values if isinstance(v, torch.SymInt)
                    or isinstance(v, torch.Tensor) and any(isinstance(side, torch.SymInt) for side in v.shape)]
        graphs.append(([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor) and t.dim() == 4][:1],
                       symbolic))
        return gm.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend=backend, **kw))
    torch._dynamo.reset()
    code, _, err = run_main("train", ["--data", str(data), "--output-dir", str(tmp_path / "run"), *TINY, "--compile", "on",
              "--max-steps", "4", "--eval-every", "2", "--log-every", "2", "--mixed-precision", "no"], capsys)
    torch._dynamo.reset()
    assert code == 0, err[-3000:]
    # Four steps and three evaluations (steps 2 and 4, the second of them also the final one).
    assert graphs == [([(4, 3, 32, 32)], []), ([(4, 3, 48, 48)], [])], graphs  # no symbolic size in either
