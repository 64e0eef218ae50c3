"""What a run reports while it trains, on the main process only: the progress bar, and
experiment tracking through Accelerate's trackers.

W&B runs offline, with no network call and no prompt, unless credentials are configured
(``WANDB_API_KEY``, or a ``wandb login`` entry in ``~/.netrc``) or ``WANDB_MODE`` says
otherwise; its files go inside the run dir (``RUN/wandb/offline-run-*``), to be uploaded
later with ``wandb sync``.
"""

from __future__ import annotations

import netrc
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from unetseg.errors import UnetsegError

if TYPE_CHECKING:
    from unetseg.train import Run


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


def pct(value: float | None) -> str:
    """A fraction as a percentage with 2 decimals; None or NaN (undefined) as n/a."""
    return "n/a" if value is None or value != value else f"{100 * value:.2f}"


def tracker_metrics(metrics: dict[str, Any], bad: int) -> dict[str, Any]:
    out = {f"val/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}
    for name, values in metrics.get("per_class", {}).items():
        if values.get("iou") is not None:
            out[f"val/iou/{name}"] = values["iou"]
    out["train/bad_samples"] = bad
    return out


class Progress:
    """A progress bar with loss, images/s and ETA on the main process; silent elsewhere."""

    def __init__(self, enabled: bool, total: int, start: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), disable=not enabled)
        self.task = self.bar.add_task("train", total=total, completed=start, info="")
        self.bar.start()

    def update(self, step: int, record: dict[str, Any]) -> None:
        self.bar.update(self.task, completed=step, info=f"loss {record['loss']:.4f}  {record['images_per_s']:.1f} img/s")

    def print(self, text: str) -> None:
        if not self.bar.disable:
            self.bar.console.print(text, markup=False, highlight=False, soft_wrap=True)  # paths stay whole

    def close(self) -> None:
        self.bar.stop()


class Reporter:
    """What the run tells the user on the main process: the progress bar, ``metrics.jsonl``
    and the tracker. Losses are averaged over ranks every ``log_every`` steps (a
    collective, so every rank calls it); images/s counts training time only."""

    def __init__(self, run: Run, train_stats):
        from unetseg.tracking import Progress

        self.run, self.train_stats = run, train_stats
        self.path = run.run_dir / "metrics.jsonl"
        self.progress = Progress(run.main, run.total_steps, run.state.step)
        self.losses: list[torch.Tensor] = []
        self.bad = 0
        self.last_table = ""
        self.restart_clock()

    def restart_clock(self) -> None:
        self.window_start, self.window_steps = time.perf_counter(), 0

    def due(self, stopped: bool) -> bool:
        """Whether :meth:`log_step` logs after the step just taken."""
        step, rc = self.run.state.step, self.run.config.run
        return step % rc.log_every == 0 or step == self.run.total_steps or stopped

    def log_step(self, lr: float, stopped: bool) -> None:
        from unetseg.distributed import all_reduce_sum
        from unetseg.runstate import append_jsonl

        run, step = self.run, self.run.state.step
        self.window_steps += 1
        if not self.due(stopped):
            return
        world, device = run.accelerator.num_processes, run.accelerator.device
        # The mean of the finite losses, on the device: one read for the whole window.
        losses = torch.stack(self.losses) if self.losses else torch.zeros(0, device=device)
        finite = torch.isfinite(losses)
        mean = torch.where(finite, losses, 0).sum() / finite.sum().clamp(min=1)
        loss_mean = all_reduce_sum(mean.reshape(1)) / world
        images = self.window_steps * run.config.optim.grad_accum * run.config.data.batch_size * world
        record = {"step": step, "epoch": (step - 1) // run.data.steps_per_epoch, "lr": lr,
                  "loss": round(float(loss_mean), 6),
                  "images_per_s": round(images / (time.perf_counter() - self.window_start), 2)}
        if run.main:
            append_jsonl(self.path, record)
            run.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
            self.progress.update(step, record)
        self.losses = []
        self.restart_clock()

    def log_epoch(self) -> None:
        """Skipped samples, merged over ranks once per epoch (a collective)."""
        before, self.bad = self.bad, self.train_stats.reduce()
        if self.run.main and self.bad > before:
            epoch = (self.run.state.step - 1) // self.run.data.steps_per_epoch
            self.progress.print(f"epoch {epoch}: {self.bad} bad training samples skipped so far:\n  "
                                + "\n  ".join(self.train_stats.problems()))

    def log_eval(self, result, examples, val_bad: int) -> None:
        from unetseg.runstate import append_jsonl
        from unetseg.tracking import log_predictions, tracker_metrics

        run, ts = self.run, self.run.state
        self.last_table = str(result)
        if not run.main:
            return
        metrics = result.to_dict()
        # The lr of the step just taken (the schedule is a function of the step number).
        lr = run.scheduler.base_lrs[0] * run.scheduler.lr_lambdas[0](max(0, ts.step - 1))
        append_jsonl(self.path, {"step": ts.step, "epoch": max(0, ts.step - 1) // run.data.steps_per_epoch, "lr": lr,
                                 **metrics, "val_bad_samples": val_bad, "bad_samples": self.bad,
                                 "best_mIoU": ts.best_miou})
        run.accelerator.log(tracker_metrics(metrics, self.bad), step=ts.step)
        tf = run.data.train_tf.config
        log_predictions(run.accelerator, examples, run.data.classes, tf.mean, tf.std, ts.step)
        self.progress.print(f"step {ts.step}: val mIoU {pct(metrics['mIoU'])} (best {pct(ts.best_miou)} "
                            f"at step {ts.best_step})")

    def close(self) -> None:
        self.progress.close()
