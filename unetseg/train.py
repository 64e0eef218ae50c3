"""Train a U-Net: ``python -m unetseg.train``, ``accelerate launch -m unetseg.train`` (any
number of processes, GPUs or CPU) and ``unetseg train`` are this one entry point.

The loop, top to bottom: build (data, model, optimiser, schedule), maybe resume, then for
each optimiser step: forward/backward over ``grad_accum`` micro-batches, clip, step, log;
evaluate every ``eval_every`` steps; checkpoint every ``save_every`` steps; stop cleanly on
SIGTERM/SIGINT. The run dir gets ``config.yaml``, ``dataset.json``, ``metrics.jsonl``,
``checkpoints/``, ``best/`` and ``final/``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from unetseg.config import TrainConfig, build_config, flags
from unetseg.errors import UnetsegError

DEFAULT_DATA = "shards/synthetic"


# --- command line ------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="unetseg train",
        description="Train a U-Net on a shard folder (default: the embedded synthetic set). "
        "Run under `accelerate launch` for several processes or GPUs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", help="YAML file with data/model/optim/loss/run sections; flags win over it")
    for f in flags():
        if f.kind is bool:
            p.add_argument(f.flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=f.help)
        else:
            p.add_argument(f.flag, default=argparse.SUPPRESS, help=f.help, metavar="VALUE")
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    args = vars(parser().parse_args(argv))
    config_file = args.pop("config", None)
    overrides = {key.replace("_", "-"): (str(v).lower() if isinstance(v, bool) else v) for key, v in args.items()}
    return build_config(config_file, overrides)


# --- state that travels in checkpoints --------------------------------------------------


@dataclass
class TrainerState:
    step: int = 0
    """Optimiser steps taken; the stream has handed out ``step * grad_accum`` micro-batches."""
    best_miou: float | None = None
    best_step: int | None = None
    nonfinite_streak: int = 0
    tracker_run_id: str | None = None
    scheduler: dict[str, Any] = field(default_factory=dict)


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop reads it (and agrees on it across ranks) between steps."""

    def __init__(self) -> None:
        self.requested = False
        self.signal: str | None = None

    def __call__(self, signum, frame) -> None:
        self.requested, self.signal = True, signal.Signals(signum).name

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self)
        signal.signal(signal.SIGINT, self)


# --- helpers ----------------------------------------------------------------------------


def has_accelerator() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return torch.cuda.is_available() or bool(mps and mps.is_available()) or bool(getattr(torch, "xpu", None) and torch.xpu.is_available())


def most_common_size(image_sizes: dict[str, int]) -> list[int]:
    size = Counter(image_sizes).most_common(1)[0][0]
    return [int(v) for v in size.split("x")]


def resolve_run_dir(config: TrainConfig) -> Path:
    """The run dir, the same on every rank (rank 0 picks the timestamp)."""
    from accelerate.utils import broadcast_object_list

    name = [config.run.output_dir or f"runs/{datetime.now().strftime('%Y%m%d-%H%M%S')}"]
    broadcast_object_list(name)
    return Path(name[0])


def ensure_default_data(config: TrainConfig, state) -> str:
    """``--data``, or the embedded synthetic set (generated once, by the main process)."""
    if config.data.data:
        return config.data.data
    if state.is_main_process and not (Path(DEFAULT_DATA) / "dataset.json").is_file():
        from unetseg.synth import synth

        print(f"generating the embedded synthetic dataset in {DEFAULT_DATA} ...", flush=True)
        synth(DEFAULT_DATA, overwrite=True, progress=False)
    state.wait_for_everyone()
    return DEFAULT_DATA


def sync_buffers(net: torch.nn.Module, world: int) -> None:
    """Average BatchNorm running statistics over ranks (each rank updated them with its own
    batches since DDP last broadcast them), so every rank evaluates, and rank 0 saves,
    the same model."""
    if world == 1:
        return
    from unetseg.distributed import all_reduce_sum

    # Integer buffers (num_batches_tracked) are the same on every rank already.
    for buffer in net.buffers():
        if buffer.is_floating_point():
            buffer.copy_(all_reduce_sum(buffer.detach().clone()) / world)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after ``step`` (by a run that died after its last checkpoint)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if json.loads(line)["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    tmp.replace(path)


# --- the loop ---------------------------------------------------------------------------


def train(config: TrainConfig, batches: Iterator[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Train as ``config`` says; returns the final evaluation metrics (and ``stopped``).

    ``batches`` replaces the training stream (each a dict with ``image`` and ``mask``
    tensors), e.g. in-memory data for ``benchmarks/train_step.py``; the classes and the
    validation split still come from ``config.data``."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import ProjectConfiguration, set_seed

    from unetseg.checkpoint import latest_checkpoint, load_checkpoint, resolve_resume, save_checkpoint, save_model
    from unetseg.distributed import all_reduce_sum
    from unetseg.evaluate import confusion_matrix
    from unetseg.losses import SegmentationLoss, class_weights
    from unetseg.model import UNet, UNetConfig
    from unetseg.optim import build_optimizer, build_scheduler
    from unetseg.stream import (
        EvalStream, StreamStats, TrainStream, batches_per_epoch, iterate, make_loader, open_source,
    )
    from unetseg.tracking import flat_config, log_predictions, tracker_setup
    from unetseg.transforms import EvalTransform, EvalTransformConfig, TrainTransform, TrainTransformConfig

    dc, oc, rc = config.data, config.optim, config.run
    # Without an accelerator, Accelerate only forms a (gloo) process group when told cpu=True.
    state = PartialState(cpu=not has_accelerator())
    run_dir = resolve_run_dir(config)
    resume_from = resolve_resume(run_dir, rc.resume)
    if rc.resume is None and latest_checkpoint(run_dir) is not None:
        raise UnetsegError(
            f"{run_dir} already holds checkpoints of a run. Fix: pass --resume auto to continue it, "
            "or choose another --output-dir"
        )
    resumed = TrainerState(**json.loads((resume_from / "trainer_state.json").read_text())) if resume_from else None
    log_with, init_kwargs = tracker_setup(rc.tracker, run_dir, rc.run_name or run_dir.name,
                                          resumed.tracker_run_id if resumed else None)
    accelerator = Accelerator(
        cpu=not has_accelerator(),
        mixed_precision=rc.mixed_precision,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        step_scheduler_with_optimizer=False,
    )
    device, main = accelerator.device, accelerator.is_main_process
    set_seed(rc.seed)  # the same on every rank: identical initial weights

    # Data.
    data = ensure_default_data(config, state)
    train_source = open_source(data, dc.train_split, dc.dataset_json)
    val_source = open_source(data, dc.val_split, dc.dataset_json)
    info, classes = train_source.info, train_source.info.classes
    if train_source.num_samples is None:
        raise UnetsegError(f"{data}: the training shards' sample counts are unknown. Fix: use shard names listed in dataset.json")
    ignore = classes.ignore_index
    crop = dc.crop_size or most_common_size(info.split(dc.train_split).image_sizes)
    train_tf = TrainTransform(TrainTransformConfig(crop_size=crop, resize=dc.resize, scale_range=tuple(dc.scale_range),
                                                   hflip=dc.hflip, jitter=dc.jitter), ignore)
    eval_tf = EvalTransform(EvalTransformConfig(resize=dc.eval_resize))
    world, accum = accelerator.num_processes, oc.grad_accum
    steps_per_epoch = batches_per_epoch(train_source.num_samples, dc.batch_size * accum, world)
    total_steps = rc.max_steps or rc.epochs * steps_per_epoch
    eval_every = rc.eval_every or steps_per_epoch
    save_every = rc.save_every or eval_every

    # Model, optimiser, schedule, loss.
    unet_config = UNetConfig(num_classes=classes.num_classes, width=config.model.width, depth=config.model.depth,
                             norm=config.model.norm, dropout=config.model.dropout, upsample=config.model.upsample)
    net = UNet(unet_config)
    if rc.sync_bn and world > 1:
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    channels_last = rc.channels_last == "on" or (rc.channels_last == "auto" and device.type == "cuda")
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(net, oc.optimizer, lr=oc.lr, weight_decay=oc.weight_decay, betas=tuple(oc.betas),
                                eps=oc.eps, momentum=oc.momentum, nesterov=oc.nesterov)
    # Kept out of accelerator.prepare, whose wrapper steps it once per process per step.
    scheduler = build_scheduler(optimizer, oc.scheduler, total_steps=total_steps, warmup_steps=oc.warmup_steps,
                                power=oc.power, min_lr_ratio=oc.min_lr_ratio)
    model, optimizer = accelerator.prepare(net, optimizer)
    forward = torch.compile(model) if rc.compile else model
    weights_spec = config.loss.class_weights
    weights = class_weights([float(v) for v in weights_spec.split(",")] if "," in weights_spec else weights_spec,
                            info.split(dc.train_split).pixel_counts)
    loss_fn = SegmentationLoss(config.loss.loss, ignore, weights, config.loss.label_smoothing, config.loss.dice_weight).to(device)

    # Resume, or start the run dir.
    ts = resumed or TrainerState()
    metrics_path = run_dir / "metrics.jsonl"
    if resume_from:
        load_checkpoint(accelerator, resume_from)
        scheduler.load_state_dict(ts.scheduler)
    saved_config = {**config.to_dict(), "unet": unet_config.to_dict()}
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config.to_yaml(), encoding="utf-8")
        (run_dir / "dataset.json").write_text(info.to_json(), encoding="utf-8")
        truncate_metrics(metrics_path, ts.step)
        print(config.to_yaml(), end="")
        print(f"{net.describe()}; {world} process(es) on {device.type}, mixed precision {accelerator.mixed_precision}"
              f"{', channels_last' if channels_last else ''}; {total_steps} steps of {dc.batch_size} x {world} x {accum} images ({steps_per_epoch} per epoch); "
              f"run dir {run_dir}" + (f"; resuming from {resume_from} at step {ts.step}" if resume_from else ""), flush=True)
    if log_with:
        accelerator.init_trackers(rc.project, config=flat_config(config.to_dict()), init_kwargs=init_kwargs)
        if main and rc.tracker == "wandb":
            ts.tracker_run_id = accelerator.get_tracker("wandb", unwrap=True).id

    train_stream = TrainStream(train_source, train_tf, dc.batch_size, batches_per_epoch=steps_per_epoch * accum,
                               rank=accelerator.process_index, world_size=world, seed=rc.seed,
                               start_batch=ts.step * accum, shuffle_buffer=dc.shuffle_buffer, max_bad_samples=dc.max_bad_samples)
    train_stats, eval_stats = StreamStats(dc.max_bad_samples), StreamStats(dc.max_bad_samples)
    if batches is None:
        batches = iterate(make_loader(train_stream, dc.num_workers), train_stats)
    eval_loader = make_loader(EvalStream(val_source, eval_tf, dc.eval_batch_size or dc.batch_size, rank=accelerator.process_index,
                                         world_size=world, max_bad_samples=dc.max_bad_samples), dc.num_workers)

    def evaluate():
        sync_buffers(net, world)
        cm, examples = confusion_matrix(net, iterate(eval_loader, eval_stats), classes.num_classes, ignore, classes.names,
                                        device, accelerator.autocast, keep=rc.log_images if main else 0)
        result = cm.reduce().compute()
        eval_stats.reduce()
        if result.num_samples != val_source.num_samples - eval_stats.bad_samples and main:
            print(f"warning: evaluated {result.num_samples} samples, the split has {val_source.num_samples}", flush=True)
        if main:
            log_predictions(accelerator, examples, classes, train_tf.config.mean, train_tf.config.std, ts.step)
        return result

    def save() -> None:
        ts.scheduler = scheduler.state_dict()
        save_checkpoint(accelerator, run_dir, ts.step, ts.__dict__.copy(), rc.keep_checkpoints)

    stop = StopFlag()
    stop.install()
    model.train()
    window_losses: list[torch.Tensor] = []
    window_start, window_steps = time.perf_counter(), 0
    last_eval: dict[str, Any] | None = None
    train_bad = 0
    stopped = False
    progress = _Progress(main, total_steps, ts.step)
    try:
        while ts.step < total_steps:
            skip = False
            for micro in range(accum):
                batch = next(batches)
                image = batch["image"].to(device, non_blocking=True)
                if channels_last:
                    image = image.contiguous(memory_format=torch.channels_last)
                mask = batch["mask"].to(device, non_blocking=True)
                # Gradients are all-reduced on the last micro-batch only.
                sync = contextlib.nullcontext() if micro == accum - 1 else accelerator.no_sync(model)
                with sync:
                    with accelerator.autocast():
                        loss = loss_fn(forward(image), mask)
                    # Every rank must agree before backward (a rank skipping it alone would hang
                    # the gradient all-reduce); the same tiny all-reduce carries the stop flag.
                    # A CPU-GPU sync point, once per micro-batch.
                    agree = all_reduce_sum(torch.tensor([float(not torch.isfinite(loss)), float(stop.requested)], device=device))
                    nonfinite, stop_now = bool(agree[0] > 0), bool(agree[1] > 0)
                    stopped = stopped or stop_now
                    if nonfinite:
                        skip = True
                    elif not skip:
                        accelerator.backward(loss / accum)
                window_losses.append(loss.detach().float())
            if skip:
                optimizer.zero_grad(set_to_none=True)
                ts.nonfinite_streak += 1
                if main:
                    print(f"warning: non-finite loss at step {ts.step + 1}; step skipped "
                          f"({ts.nonfinite_streak} in a row, the run stops at {rc.max_nonfinite})", flush=True)
                if ts.nonfinite_streak >= rc.max_nonfinite:
                    raise UnetsegError(
                        f"{ts.nonfinite_streak} non-finite losses in a row (step {ts.step + 1}). Fix: lower --lr, "
                        "add --warmup-steps or --grad-clip 1.0, or use --mixed-precision bf16 instead of fp16"
                    )
            else:
                ts.nonfinite_streak = 0
                if oc.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), oc.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            # The lr is a function of the step count alone: the schedule steps on every step.
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            ts.step += 1
            window_steps += 1
            epoch = (ts.step - 1) // steps_per_epoch
            if ts.step % rc.log_every == 0 or ts.step == total_steps or stopped:
                finite = [l for l in window_losses if torch.isfinite(l)]
                loss_mean = all_reduce_sum(torch.stack(finite).mean().reshape(1) if finite else torch.zeros(1, device=device)) / world
                elapsed = time.perf_counter() - window_start
                record = {"step": ts.step, "epoch": epoch, "lr": lr, "loss": round(float(loss_mean), 6),
                          "images_per_s": round(window_steps * accum * dc.batch_size * world / elapsed, 2)}
                if main:
                    append_jsonl(metrics_path, record)
                    accelerator.log({k: v for k, v in record.items() if k != "step"}, step=ts.step)
                    progress.update(ts.step, record)
                window_losses, window_start, window_steps = [], time.perf_counter(), 0
            if ts.step % steps_per_epoch == 0 or ts.step == total_steps:
                # Skipped samples, summed over ranks once per epoch (a collective).
                train_bad = train_stats.reduce()
                if main and train_bad:
                    progress.print(f"epoch {epoch}: {train_bad} bad training samples skipped so far")
            if ts.step % eval_every == 0 or ts.step == total_steps:
                table = evaluate()
                metrics = last_eval = table.to_dict()
                improved = ts.best_miou is None or (metrics["mIoU"] is not None and metrics["mIoU"] > ts.best_miou)
                if improved and metrics["mIoU"] is not None:
                    ts.best_miou, ts.best_step = metrics["mIoU"], ts.step
                if main:
                    record = {"step": ts.step, "epoch": epoch, "lr": lr, **metrics, "bad_samples": train_bad,
                              "best_mIoU": ts.best_miou}
                    append_jsonl(metrics_path, record)
                    accelerator.log(_tracker_metrics(metrics, train_bad), step=ts.step)
                    progress.print(f"step {ts.step}: val mIoU {_pct(metrics['mIoU'])} (best {_pct(ts.best_miou)} at step {ts.best_step})")
                    if improved:
                        save_model(run_dir / "best", net, saved_config, info)
                window_start = time.perf_counter()  # images/s counts training only
            if ts.step % save_every == 0 or ts.step == total_steps or stopped:
                save()
                window_start = time.perf_counter()
            if stopped:
                if main:
                    progress.print(f"stopped by {stop.signal or 'a signal on another rank'} at step {ts.step}; "
                                   f"continue with --resume auto --output-dir {run_dir}")
                break
        progress.close()
        if not stopped and main:
            save_model(run_dir / "final", net, saved_config, info)
            print(table, flush=True)
            print(f"final val mIoU {_pct(last_eval['mIoU'])} (best {_pct(ts.best_miou)} at step {ts.best_step}); "
                  f"models in {run_dir / 'best'} and {run_dir / 'final'}", flush=True)
        return (last_eval or {}) | {"stopped": stopped, "step": ts.step, "run_dir": str(run_dir)}
    finally:
        progress.close()
        accelerator.end_training()


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def _tracker_metrics(metrics: dict[str, Any], bad: int) -> dict[str, Any]:
    out = {f"val/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}
    for name, values in metrics.get("per_class", {}).items():
        if values.get("iou") is not None:
            out[f"val/iou/{name}"] = values["iou"]
    out["train/bad_samples"] = bad
    return out


class _Progress:
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
            self.bar.console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        self.bar.stop()


def main(argv: list[str] | None = None) -> None:
    try:
        result = train(parse_args(argv))
    except UnetsegError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    sys.exit(0 if result else 1)


if __name__ == "__main__":
    main()
