"""Checkpoints: durable against a node crash (every file and folder fsynced before the
rename, the parent folder after it)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from unetseg.checkpoint import latest_checkpoint, save_checkpoint, save_model, write_text_atomic


def record_io(monkeypatch) -> list[tuple[str, str]]:
    """Every fsync (by path) and rename, in order."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fake_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def fake_replace(src, dst):
        events.append(("rename", f"{src} -> {dst}"))
        real_replace(src, dst)

    def fake_rename(src, dst):
        events.append(("rename", f"{src} -> {dst}"))
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fake_fsync)
    monkeypatch.setattr(os, "replace", fake_replace)
    monkeypatch.setattr(os, "rename", fake_rename)
    return events


def check_durable(events: list[tuple[str, str]], tmp: Path, final: Path) -> None:
    rename = events.index(("rename", f"{tmp} -> {final}"))
    synced_before = {path for kind, path in events[:rename] if kind == "fsync"}
    for path in [*final.rglob("*"), final]:
        assert str(path).replace(str(final), str(tmp), 1) in synced_before, path
    assert ("fsync", str(final.parent)) in events[rename + 1 :]  # the rename itself


def test_a_checkpoint_is_fsynced_before_and_after_its_rename(tmp_path, monkeypatch):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(torch.nn.Linear(3, 2), torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), 0.1))
    events = record_io(monkeypatch)
    final = save_checkpoint(accelerator, tmp_path, 5, {"step": 5}, keep=2)
    assert final == latest_checkpoint(tmp_path) and len(list(final.iterdir())) >= 3
    check_durable(events, final.with_name(final.name + ".tmp"), final)


def test_a_saved_model_and_run_files_are_fsynced(tmp_path, monkeypatch):
    from unetseg.dataset import ClassInfo, DatasetInfo
    from unetseg.models.unet import UNet, UNetConfig

    info = DatasetInfo(classes=ClassInfo(names=["a", "b"], palette=[[0, 0, 0], [1, 1, 1]]), splits={})
    net = UNet(UNetConfig(num_classes=2, width=4, depth=1))
    events = record_io(monkeypatch)
    save_model(tmp_path / "best", net, {"unet": net.config.to_dict()}, info)
    check_durable(events, tmp_path / "best.tmp", tmp_path / "best")
    events.clear()
    write_text_atomic(tmp_path / "config.yaml", "a: 1\n")
    assert events == [("fsync", str(tmp_path / "config.yaml.tmp")),
                      ("rename", f"{tmp_path / 'config.yaml.tmp'} -> {tmp_path / 'config.yaml'}"),
                      ("fsync", str(tmp_path))]
