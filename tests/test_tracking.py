"""unetseg.tracking: tracker settings (offline W&B without credentials), what is logged, and a progress bar that is silent off the main process.

The end-to-end offline W&B run is test_train.py::test_wandb_offline_without_credentials.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from unetseg.errors import UnetsegError
from unetseg.metrics import ConfusionMatrix
from unetseg.tracking import Progress, colourise, flat_config, pct, tracker_metrics, tracker_setup


@pytest.fixture
def no_wandb_login(monkeypatch, tmp_path):
    """No W&B key, no WANDB_MODE, and a netrc file that does not exist."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    return tmp_path


def test_wandb_is_offline_without_credentials_and_resumes_by_id(no_wandb_login):
    run_dir = no_wandb_login / "run"
    assert tracker_setup("wandb", run_dir, "exp1", None) == (
        "wandb", {"wandb": {"dir": str(run_dir), "name": "exp1", "mode": "offline"}})
    _, kwargs = tracker_setup("wandb", run_dir, "exp1", "abc123")
    assert kwargs["wandb"] == {"dir": str(run_dir), "name": "exp1", "mode": "offline", "id": "abc123", "resume": "allow"}


@pytest.mark.parametrize("how", ["api_key", "netrc", "wandb_mode"])
def test_wandb_mode_is_left_to_wandb_with_credentials_or_wandb_mode(no_wandb_login, monkeypatch, how):
    if how == "api_key":
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    elif how == "netrc":
        netrc = no_wandb_login / "netrc"
        netrc.write_text("machine api.wandb.ai\n  login user\n  password secret\n")
        monkeypatch.setenv("NETRC", str(netrc))
    else:
        monkeypatch.setenv("WANDB_MODE", "online")
    log_with, kwargs = tracker_setup("wandb", no_wandb_login, "exp", None)
    assert log_with == "wandb" and "mode" not in kwargs["wandb"]


def test_a_netrc_for_another_host_is_no_wandb_login(no_wandb_login, monkeypatch):
    netrc = no_wandb_login / "netrc"
    netrc.write_text("machine github.com\n  login user\n  password secret\n")
    monkeypatch.setenv("NETRC", str(netrc))
    assert tracker_setup("wandb", no_wandb_login, "exp", None)[1]["wandb"]["mode"] == "offline"


def test_no_tracker_and_tensorboard_missing(tmp_path, monkeypatch):
    assert tracker_setup("none", tmp_path, "exp", "abc") == (None, {})
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import fails as if not installed
    with pytest.raises(UnetsegError, match="needs the tensorboard package. Fix: pip install tensorboard"):
        tracker_setup("tensorboard", tmp_path, "exp", None)


def test_flat_config_joins_sections_and_lists():
    config = {"optim": {"lr": 0.01, "milestones": [3, 7]}, "data": {"crop_size": [256, 512], "name": None}}
    assert flat_config(config) == {"optim.lr": 0.01, "optim.milestones": "3,7", "data.crop_size": "256,512", "data.name": None}


def test_colourise_paints_classes_and_leaves_other_labels_white():
    palette = [[10, 20, 30], [40, 50, 60], [70, 80, 90]]
    labels = torch.tensor([[0, 1, 2], [255, 3, 300]])  # ignored, unused id, out of range
    picture = colourise(labels, palette, 255)
    assert picture.dtype == np.uint8 and picture.shape == (2, 3, 3)
    assert picture.tolist() == [[[10, 20, 30], [40, 50, 60], [70, 80, 90]], [[255, 255, 255]] * 3]


def test_pct():
    assert pct(None) == "n/a"
    assert pct(0.123456) == "12.35" and pct(1.0) == "100.00" and pct(0) == "0.00"


def test_tracker_metrics_logs_defined_numbers_only():
    cm = ConfusionMatrix(3, class_names=["sky", "road", "car"])  # car never appears: its IoU is undefined
    cm.update(torch.tensor([[0, 1, 1, 0]]), torch.tensor([[0, 1, 0, 0]]))
    metrics = cm.compute().to_dict()
    out = tracker_metrics(metrics, bad=4)
    assert out["val/mIoU"] == metrics["mIoU"] and out["val/num_pixels"] == 4 and out["val/num_samples"] == 1
    assert out["val/iou/sky"] == pytest.approx(2 / 3) and out["val/iou/road"] == pytest.approx(1 / 2)
    assert "val/iou/car" not in out and out["train/bad_samples"] == 4
    assert all(isinstance(v, (int, float)) for v in out.values())  # no lists, dicts or None
    assert not any(k in out for k in ("val/per_class", "val/confusion_matrix"))


def test_progress_prints_on_the_main_process_only(capsys):
    path = "/a/very/long/run/directory/" + "nested/" * 12 + "checkpoints/step-00000004 [bold]kept[/bold]"
    for enabled in (True, False):
        bar = Progress(enabled, total=10, start=0)
        bar.update(3, {"loss": 0.5, "images_per_s": 12.0})
        bar.print(path)
        bar.close()
        out = capsys.readouterr()
        if enabled:
            assert path in out.out  # one piece: neither wrapped nor read as markup
        else:
            assert out.out == "" and out.err == ""
