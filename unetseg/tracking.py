"""Experiment tracking through Accelerate's trackers (main process only).

W&B runs offline, with no network call and no prompt, unless credentials are configured
(``WANDB_API_KEY``, or a ``wandb login`` entry in ``~/.netrc``) or ``WANDB_MODE`` says
otherwise; its files go inside the run dir (``RUN/wandb/offline-run-*``), to be uploaded
later with ``wandb sync``.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unetseg.errors import UnetsegError


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        path = os.environ.get("NETRC") or str(Path.home() / ".netrc")
        hosts = netrc.netrc(path).hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any("wandb" in host for host in hosts)


def tracker_setup(tracker: str, run_dir: Path, run_name: str, resume_id: str | None) -> tuple[str | None, dict[str, Any]]:
    """``log_with`` and ``init_kwargs`` for ``Accelerator`` / ``init_trackers``."""
    if tracker == "none":
        return None, {}
    if tracker == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise UnetsegError("--tracker tensorboard needs the tensorboard package. Fix: pip install tensorboard") from None
        return "tensorboard", {}
    kwargs: dict[str, Any] = {"dir": str(run_dir), "name": run_name}
    if not os.environ.get("WANDB_MODE") and not wandb_has_credentials():
        kwargs["mode"] = "offline"
    if resume_id:
        kwargs.update(id=resume_id, resume="allow")
    return "wandb", {"wandb": kwargs}


def flat_config(config: dict[str, Any]) -> dict[str, Any]:
    """``{"section.key": value}`` with lists as strings: what every tracker accepts."""
    out = {}
    for section, values in config.items():
        for key, value in values.items():
            out[f"{section}.{key}"] = ",".join(map(str, value)) if isinstance(value, list) else value
    return out


def colourise(labels: torch.Tensor, palette: list[list[int]], ignore_index: int | None) -> np.ndarray:
    """HxW labels to an HxWx3 uint8 picture in the dataset palette (ignored pixels white)."""
    lut = np.full((256, 3), 255, dtype=np.uint8)
    lut[: len(palette)] = palette
    return lut[labels.clamp(0, 255).to(torch.uint8).numpy()]


def log_predictions(accelerator, examples: list[dict[str, torch.Tensor]], classes, mean, std, step: int) -> None:
    """A few validation images with their predicted and true masks, as W&B mask overlays
    when W&B is on, else as side-by-side pictures for image-capable trackers."""
    if not examples or not accelerator.is_main_process:
        return
    images = []
    for ex in examples:
        pixels = ex["image"].float() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
        images.append((pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    labels = dict(enumerate(classes.names))
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            import wandb

            pictures = [
                wandb.Image(img, masks={
                    "prediction": {"mask_data": ex["pred"].numpy(), "class_labels": labels},
                    "ground_truth": {"mask_data": ex["target"].clamp(0, 255).numpy(), "class_labels": labels},
                })
                for img, ex in zip(images, examples)
            ]
            tracker.log({"val/predictions": pictures}, step=step)
        elif tracker.name == "tensorboard":
            for i, (img, ex) in enumerate(zip(images, examples)):
                row = np.concatenate([img, colourise(ex["pred"], classes.palette, classes.ignore_index),
                                      colourise(ex["target"], classes.palette, classes.ignore_index)], axis=1)
                tracker.writer.add_image(f"val/prediction_{i}", row, step, dataformats="HWC")
