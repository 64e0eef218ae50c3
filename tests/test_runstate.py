"""What a run leaves on disk for its resume: the trainer state, the setup a resume must
match, the run dir chosen for every rank, and metrics.jsonl cut back to the checkpoint."""

from __future__ import annotations

import json

import pytest

from unetseg.checkpoint import STATE_FILE
from unetseg.config import TrainConfig
from unetseg.errors import UnetsegError
from unetseg.runstate import TrainerState, append_jsonl, check_setup, choose_start, read_jsonl, truncate_metrics

UNET = {"num_classes": 10, "in_channels": 3, "depth": 2, "width": 8, "max_width": None, "norm": "batch",
        "dropout": 0.0, "upsample": "transpose"}


def setup(**changes):
    """A setup as this version records it (model options with every field); UNET alone
    is how versions before the registry and before model.block recorded them."""
    return {"world_size": 1, "num_workers": 0, "batch_size": 4, "grad_accum": 1, "seed": 0, "shuffle_buffer": 256,
            "train_split": "train", "train_shards": [["train-000000.tar", 8]],
            "model": {"name": "unet", **UNET, "block": "plain"}, "deep_supervision": False, **changes}


def test_a_changed_setup_is_refused_with_each_change_and_its_fix(tmp_path):
    with pytest.raises(UnetsegError) as e:
        check_setup(setup(), setup(batch_size=8, seed=1), tmp_path)
    text = str(e.value)
    assert "batch_size: 4 when the run started, 8 now (fix: --batch-size)" in text and "seed: 0" in text
    assert "world_size" not in text
    check_setup(setup(), setup(), tmp_path)


def test_a_checkpoint_from_before_the_model_registry_resumes():
    """Its setup recorded the U-Net's options without a name (and without a block)."""
    check_setup(setup(model=dict(UNET)), setup(), None)
    with pytest.raises(UnetsegError, match="model"):
        check_setup(setup(model={**UNET, "width": 16}), setup(), None)


def test_trainer_state_ignores_fields_it_does_not_know(tmp_path):
    (tmp_path / STATE_FILE).write_text(json.dumps({"step": 7, "pending_eval": True, "from_the_future": 1}))
    state = TrainerState.load(tmp_path)
    assert state.step == 7 and state.pending_eval and state.setup == {}


def test_metrics_are_cut_back_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for record in ({"step": 5, "loss": 1.0}, {"step": 10, "loss": 0.5}, {"step": 10, "mIoU": 0.3}, {"step": 12, "loss": 0.4}):
        append_jsonl(path, record)
    truncate_metrics(path, 10)
    assert [r["step"] for r in read_jsonl(path)] == [5, 10, 10]
    truncate_metrics(path, 10, pending_eval=True)  # the evaluation at step 10 runs again
    assert read_jsonl(path) == [{"step": 5, "loss": 1.0}, {"step": 10, "loss": 0.5}]


def test_a_run_dir_with_checkpoints_needs_resume(tmp_path):
    (tmp_path / "run" / "checkpoints" / "step-00000004").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step-00000004" / STATE_FILE).write_text("{}")
    config = TrainConfig.from_dict({"run": {"output_dir": str(tmp_path / "run")}})
    with pytest.raises(UnetsegError, match="already holds checkpoints.*--resume auto"):
        choose_start(config)
    assert choose_start(TrainConfig.from_dict({"run": {"output_dir": str(tmp_path / "new")}})) == (tmp_path / "new", None)
