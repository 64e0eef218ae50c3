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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from unetseg.checkpoint import STATE_FILE, WEIGHTS_FILE
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
            p.add_argument(f.flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=f.help_text)
        else:
            p.add_argument(f.flag, default=argparse.SUPPRESS, help=f.help_text, metavar="VALUE")
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
    pending_eval: bool = False
    """The evaluation due at ``step`` did not complete (a stop cut it short): resume runs it first."""
    setup: dict[str, Any] = field(default_factory=dict)
    """What the data position depends on (see :func:`run_setup`); resume refuses another."""

    @classmethod
    def load(cls, checkpoint: Path) -> TrainerState:
        data = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop reads it (and agrees on it across ranks) between
    micro-batches and between evaluation batches."""

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


def on_main(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on the main process only and hand every process its result, or raise
    its :class:`UnetsegError` on every process, so that all ranks take the same decision
    (the run dir, the checkpoint to resume from) even when their views of a shared file
    system differ for a moment."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    box: list[Any] = [None]
    if PartialState().is_main_process:
        try:
            box[0] = ("ok", fn())
        except UnetsegError as e:
            box[0] = ("error", str(e))
    broadcast_object_list(box)
    kind, value = box[0]
    if kind == "error":
        raise UnetsegError(value)
    return value


def choose_start(config: TrainConfig) -> tuple[Path, Path | None]:
    """The run dir and the checkpoint to resume from (``None``: a fresh run), chosen by
    the main process for every rank."""
    from unetseg.checkpoint import latest_checkpoint, resolve_resume

    rc = config.run

    def choose() -> tuple[str, str | None]:
        run_dir = Path(rc.output_dir or f"runs/{datetime.now().strftime('%Y%m%d-%H%M%S')}")
        resume_from = resolve_resume(run_dir, rc.resume)
        if rc.resume is None and latest_checkpoint(run_dir) is not None:
            raise UnetsegError(
                f"{run_dir} already holds checkpoints of a run. Fix: pass --resume auto to continue it, "
                "or choose another --output-dir"
            )
        return str(run_dir), (str(resume_from) if resume_from else None)

    run_dir, resume_from = on_main(choose)
    return Path(run_dir), (Path(resume_from) if resume_from else None)


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


def open_sources(config: TrainConfig, data: str):
    """The training and validation shards. The validation split comes from ``--val-data``,
    else from the same folder as the training shards (for a pattern: the shards
    dataset.json lists under the validation split); never from the training shards."""
    from unetseg.stream import open_source, sibling_split

    dc = config.data
    train = open_source(data, dc.train_split, dc.dataset_json)
    val = open_source(dc.val_data, dc.val_split, dc.dataset_json) if dc.val_data else sibling_split(train, dc.val_split)
    if train.num_samples is None:
        raise UnetsegError(f"{data}: the training shards' sample counts are unknown. Fix: use shard names listed in dataset.json")
    shared = sorted(set(train.urls) & set(val.urls))
    if shared:
        raise UnetsegError(
            f"{shared[0]}{f' and {len(shared) - 1} more' if len(shared) > 1 else ''} would be read for training and "
            "for validation, so the validation score would be measured on training data. "
            "Fix: pass --val-data with the validation shards"
        )
    a, b = train.info.classes, val.info.classes
    if (a.names, a.ignore_index) != (b.names, b.ignore_index):
        raise UnetsegError(
            f"{dc.val_data}: classes {b.names} (ignore_index {b.ignore_index}) differ from the training data's "
            f"{a.names} (ignore_index {a.ignore_index}). Fix: validate on shards packed with the same classes.json"
        )
    if val.num_samples == 0:
        raise UnetsegError(f"{val.describe()} has no samples to evaluate on. Fix: pack a validation split "
                           "(e.g. `unetseg pack --val-fraction 0.1`), or pass --val-data")
    return train, val


def run_setup(config: TrainConfig, world: int, train_source, model_config: dict[str, Any]) -> dict[str, Any]:
    """What the data position of a step depends on, as JSON types: resuming with any of
    it changed would silently continue on other data (or fail to load)."""
    dc = config.data
    return json.loads(json.dumps({
        "world_size": world,
        "num_workers": dc.num_workers,
        "batch_size": dc.batch_size,
        "grad_accum": config.optim.grad_accum,
        "seed": config.run.seed,
        "shuffle_buffer": dc.shuffle_buffer,
        "train_split": dc.train_split,
        "train_shards": [[url.rsplit("/", 1)[-1], n] for url, n in zip(train_source.urls, train_source.counts)],
        "model": model_config,
    }))


# How to give each setting its original value back.
SETUP_FIX = {
    "world_size": "launch the same number of processes (accelerate launch --num_processes N)",
    "num_workers": "--num-workers", "batch_size": "--batch-size", "grad_accum": "--grad-accum", "seed": "--seed",
    "shuffle_buffer": "--shuffle-buffer", "train_split": "--train-split",
    "train_shards": "--data with the same training shards", "model": "the same --model-* options",
}


def check_setup(saved: dict[str, Any], current: dict[str, Any], checkpoint: Path) -> None:
    """Refuse to resume ``checkpoint`` with another setup (checkpoints of older versions
    record none and are not checked)."""
    changed = [key for key in current if key in saved and saved[key] != current[key]]
    if not changed:
        return

    def short(value: Any) -> str:
        text = json.dumps(value)
        return text if len(text) <= 80 else text[:77] + "..."

    lines = [f"  - {key}: {short(saved[key])} when the run started, {short(current[key])} now "
             f"(fix: {SETUP_FIX[key]})" for key in changed]
    raise UnetsegError(
        f"cannot resume from {checkpoint}: what the data order depends on has changed:\n" + "\n".join(lines) +
        "\nFix: resume with the run's original settings (its config.yaml), or start a new run in another --output-dir"
    )


def write_run_files(run_dir: Path, config: TrainConfig, info, resumed_at: int | None) -> None:
    """``config.yaml`` and ``dataset.json`` of a new run. A resumed run keeps the original
    ``config.yaml``; a resume with other options writes them to
    ``config.resumed-step-NNNNNNNN.yaml`` beside it."""
    from unetseg.checkpoint import write_text_atomic

    run_dir.mkdir(parents=True, exist_ok=True)
    original = run_dir / "config.yaml"
    if resumed_at is None or not original.is_file():
        write_text_atomic(original, config.to_yaml())
        write_text_atomic(run_dir / "dataset.json", info.to_json())
        return
    before = TrainConfig.load(original).to_dict()
    now = config.to_dict()
    before["run"]["resume"] = now["run"]["resume"]
    if before != now:
        write_text_atomic(run_dir / f"config.resumed-step-{resumed_at:08d}.yaml", config.to_yaml())


def check_sync_bn(config: TrainConfig, state) -> None:
    if config.run.sync_bn and state.num_processes > 1 and state.device.type == "cpu":
        raise UnetsegError(
            f"--sync-bn: SyncBatchNorm runs on GPUs only, and this run has {state.num_processes} CPU processes. "
            "Fix: drop --sync-bn (each process then normalises its own batches; the running statistics are "
            "averaged over processes before every evaluation and save), or use --model-norm group"
        )


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


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def truncate_metrics(path: Path, step: int, pending_eval: bool = False) -> None:
    """Drop lines logged after ``step`` (by a run that died after its last checkpoint), and
    the evaluation at ``step`` when it is to be run again."""
    from unetseg.checkpoint import write_text_atomic

    if not path.is_file():
        return
    kept = [r for r in read_jsonl(path) if r["step"] < step or (r["step"] == step and not (pending_eval and "mIoU" in r))]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


class Evaluator:
    """Scores the model on the validation split, every sample once over all ranks. A stop
    request cuts the evaluation short (it can take minutes, longer than a launcher waits
    after SIGTERM): then it returns ``None`` on every rank."""

    def __init__(self, net, loader, val_source, classes, accelerator, stop: StopFlag, max_bad: int, keep: int):
        self.net, self.loader, self.val_source, self.classes = net, loader, val_source, classes
        self.accelerator, self.stop, self.max_bad, self.keep = accelerator, stop, max_bad, keep

    def __call__(self):
        from unetseg.distributed import all_reduce_sum
        from unetseg.evaluate import confusion_matrix
        from unetseg.stream import StreamStats, iterate

        accelerator, classes = self.accelerator, self.classes
        sync_buffers(self.net, accelerator.num_processes)
        stats = StreamStats(self.max_bad)
        cut = [False]

        def batches():
            for batch in iterate(self.loader, stats):
                if self.stop.requested:
                    cut[0] = True
                    return
                yield batch

        cm, examples = confusion_matrix(self.net, batches(), classes.num_classes, classes.ignore_label, classes.names,
                                        accelerator.device, accelerator.autocast, keep=self.keep)
        # Whether any rank cut its share short; the same on every rank, so all take the same path.
        if all_reduce_sum(torch.tensor([float(cut[0])])).item() > 0:
            return None, examples, 0
        result = cm.reduce().compute()
        bad = stats.reduce()
        expected = self.val_source.num_samples
        if accelerator.is_main_process and expected is not None and result.num_samples != expected:
            problems = "; ".join(stats.problems()[:3])
            print(f"warning: val mIoU over {result.num_samples} of the split's {expected} samples "
                  f"({bad} could not be read{': ' + problems if problems else ''})", flush=True)
        return result, examples, bad


# --- the loop ---------------------------------------------------------------------------


def train(config: TrainConfig, batches: Iterator[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Train as ``config`` says; returns the final evaluation metrics (and ``stopped``).

    ``batches`` replaces the training stream (each a dict with ``image`` and ``mask``
    tensors), e.g. in-memory data for ``benchmarks/train_step.py``; the classes and the
    validation split still come from ``config.data``."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import ProjectConfiguration, set_seed

    from unetseg.checkpoint import load_checkpoint, save_checkpoint, save_model
    from unetseg.distributed import all_reduce_sum
    from unetseg.losses import SegmentationLoss, class_weights
    from unetseg.model import UNet, UNetConfig
    from unetseg.optim import build_optimizer, build_scheduler
    from unetseg.stream import EvalStream, StreamStats, TrainStream, batches_per_epoch, derive_seed, iterate, make_loader
    from unetseg.tracking import flat_config, log_predictions, tracker_setup
    from unetseg.transforms import EvalTransform, EvalTransformConfig, TrainTransform, TrainTransformConfig

    dc, oc, rc = config.data, config.optim, config.run
    stop = StopFlag()
    stop.install()  # from the start: a stop during set-up is honoured after the first step
    # Without an accelerator, Accelerate only forms a (gloo) process group when told cpu=True.
    state = PartialState(cpu=not has_accelerator())
    check_sync_bn(config, state)
    run_dir, resume_from = choose_start(config)
    resumed = TrainerState.load(resume_from) if resume_from else None
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
    world, rank, accum = accelerator.num_processes, accelerator.process_index, oc.grad_accum

    # Data.
    data = ensure_default_data(config, state)
    train_source, val_source = open_sources(config, data)
    info, classes = train_source.info, train_source.info.classes
    crop = dc.crop_size or most_common_size(info.split(dc.train_split).image_sizes)
    train_tf = TrainTransform(TrainTransformConfig(crop_size=crop, resize=dc.resize, scale_range=tuple(dc.scale_range),
                                                   hflip=dc.hflip, jitter=dc.jitter), classes.ignore_label)
    eval_tf = EvalTransform(EvalTransformConfig(resize=dc.eval_resize))
    steps_per_epoch = batches_per_epoch(train_source.num_samples, dc.batch_size * accum, world)
    total_steps = rc.max_steps or rc.epochs * steps_per_epoch
    eval_every = rc.eval_every or steps_per_epoch
    save_every = rc.save_every or eval_every

    # Model, optimiser, schedule, loss.
    unet_config = UNetConfig(num_classes=classes.num_classes, width=config.model.width, depth=config.model.depth,
                             norm=config.model.norm, dropout=config.model.dropout, upsample=config.model.upsample)
    set_seed(rc.seed)  # the same on every rank: identical initial weights
    net = UNet(unet_config)
    # From here on each rank draws its own random numbers (dropout masks differ across ranks).
    set_seed(derive_seed(rc.seed, rank, 2))
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
    # Padding and ignored pixels carry classes.ignore_label, also when the dataset has no ignore_index.
    loss_fn = SegmentationLoss(config.loss.loss, classes.ignore_label, weights, config.loss.label_smoothing,
                               config.loss.dice_weight).to(device)

    # Resume, or start the run dir.
    setup = run_setup(config, world, train_source, unet_config.to_dict())
    ts = resumed or TrainerState(setup=setup)
    saved_config = {**config.to_dict(), "unet": unet_config.to_dict()}
    metrics_path = run_dir / "metrics.jsonl"
    finished = resume_from is not None and ts.step >= total_steps and not ts.pending_eval
    has_final = (run_dir / "final" / WEIGHTS_FILE).is_file()
    if resume_from and not (finished and has_final):
        check_setup(ts.setup, setup, resume_from)
        load_checkpoint(accelerator, resume_from)
        scheduler.load_state_dict(ts.scheduler)
    if finished:  # resubmitted after its last step: nothing left but final/ (when a stop came first)
        return finished_run(run_dir, net, saved_config, info, ts, main)
    if main:
        write_run_files(run_dir, config, info, ts.step if resume_from else None)
        truncate_metrics(metrics_path, ts.step, ts.pending_eval)
        print(config.to_yaml(), end="")
        print(f"{net.describe()}; {world} process(es) on {device.type}, mixed precision {accelerator.mixed_precision}"
              f"{', channels_last' if channels_last else ''}; {total_steps} steps of {dc.batch_size} x {world} x {accum} images ({steps_per_epoch} per epoch); "
              f"run dir {run_dir}" + (f"; resuming from {resume_from} at step {ts.step}" if resume_from else ""), flush=True)
    if log_with:
        accelerator.init_trackers(rc.project, config=flat_config(config.to_dict()), init_kwargs=init_kwargs)
        if main and rc.tracker == "wandb":
            ts.tracker_run_id = accelerator.get_tracker("wandb", unwrap=True).id

    train_stream = TrainStream(train_source, train_tf, dc.batch_size, batches_per_epoch=steps_per_epoch * accum,
                               rank=rank, world_size=world, seed=rc.seed,
                               start_batch=ts.step * accum, shuffle_buffer=dc.shuffle_buffer, max_bad_samples=dc.max_bad_samples)
    train_stats = StreamStats(dc.max_bad_samples)
    if batches is None:
        batches = iterate(make_loader(train_stream, dc.num_workers), train_stats)
    eval_loader = make_loader(EvalStream(val_source, eval_tf, dc.eval_batch_size or dc.batch_size, rank=rank,
                                         world_size=world, max_bad_samples=dc.max_bad_samples), dc.num_workers)
    evaluator = Evaluator(net, eval_loader, val_source, classes, accelerator, stop, dc.max_bad_samples,
                          rc.log_images if main else 0)

    def evaluate() -> dict[str, Any] | None:
        """The evaluation due at this step; ``None`` when a stop cut it short (resume redoes it)."""
        ts.pending_eval = True
        result, examples, bad = evaluator()
        if result is None:
            return None
        ts.pending_eval = False
        last_table[0] = str(result)
        metrics = result.to_dict()
        improved = metrics["mIoU"] is not None and (ts.best_miou is None or metrics["mIoU"] > ts.best_miou)
        if improved:
            ts.best_miou, ts.best_step = metrics["mIoU"], ts.step
        if main:
            epoch = max(0, ts.step - 1) // steps_per_epoch
            # The lr of the step just taken (the schedule is a function of the step number).
            lr = scheduler.base_lrs[0] * scheduler.lr_lambdas[0](max(0, ts.step - 1))
            append_jsonl(metrics_path, {"step": ts.step, "epoch": epoch, "lr": lr, **metrics,
                                        "val_bad_samples": bad, "bad_samples": train_bad, "best_mIoU": ts.best_miou})
            accelerator.log(_tracker_metrics(metrics, train_bad), step=ts.step)
            log_predictions(accelerator, examples, classes, train_tf.config.mean, train_tf.config.std, ts.step)
            progress.print(f"step {ts.step}: val mIoU {_pct(metrics['mIoU'])} (best {_pct(ts.best_miou)} at step {ts.best_step})")
            if improved:
                save_model(run_dir / "best", net, saved_config, info)
        return metrics

    def save() -> None:
        ts.scheduler = scheduler.state_dict()
        save_checkpoint(accelerator, run_dir, ts.step, ts.__dict__.copy(), rc.keep_checkpoints)

    model.train()
    window_losses: list[torch.Tensor] = []
    window_start, window_steps = time.perf_counter(), 0
    last_eval: dict[str, Any] | None = None
    last_table = [""]
    train_bad = 0
    stopped = False
    progress = _Progress(main, total_steps, ts.step)
    try:
        if ts.pending_eval:  # the evaluation a stop cut short, on the weights it was meant for
            last_eval = evaluate()
            stopped = last_eval is None
            save()  # records that it ran (or, stopped again, that it still has to)
        while ts.step < total_steps and not stopped:
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
                # Skipped samples, merged over ranks once per epoch (a collective).
                before, train_bad = train_bad, train_stats.reduce()
                if main and train_bad > before:
                    progress.print(f"epoch {epoch}: {train_bad} bad training samples skipped so far:\n  "
                                   + "\n  ".join(train_stats.problems()))
            if (ts.step % eval_every == 0 or ts.step == total_steps) and not stopped:
                last_eval = evaluate()
                stopped = last_eval is None
                window_start = time.perf_counter()  # images/s counts training only
            if ts.step % save_every == 0 or ts.step == total_steps or stopped:
                save()
                window_start = time.perf_counter()
        progress.close()
        if stopped:
            if main:
                print(f"stopped by {stop.signal or 'a signal on another rank'} at step {ts.step}; "
                      f"continue with --resume auto --output-dir {run_dir}", flush=True)
        elif main:
            save_model(run_dir / "final", net, saved_config, info)
            print(last_table[0], flush=True)
            print(f"final val mIoU {_pct(last_eval['mIoU'] if last_eval else None)} (best {_pct(ts.best_miou)} at step "
                  f"{ts.best_step}); models in {run_dir / 'best'} and {run_dir / 'final'}", flush=True)
        return (last_eval or {}) | {"stopped": stopped, "step": ts.step, "run_dir": str(run_dir)}
    finally:
        progress.close()
        accelerator.end_training()


def finished_run(run_dir: Path, net, saved_config: dict[str, Any], info, ts: TrainerState, main: bool) -> dict[str, Any]:
    """A resumed run whose last checkpoint is its last step: write ``final/`` if a stop
    came before it, and say the run is done."""
    from unetseg.checkpoint import save_model

    evals = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "mIoU" in r]
    last = evals[-1] if evals else {}
    if main:
        if not (run_dir / "final" / WEIGHTS_FILE).is_file():
            save_model(run_dir / "final", net, saved_config, info)
        print(f"{run_dir} already finished at step {ts.step}: final val mIoU {_pct(last.get('mIoU'))} "
              f"(best {_pct(ts.best_miou)} at step {ts.best_step}); models in {run_dir / 'best'} and "
              f"{run_dir / 'final'}. Nothing to do", flush=True)
    return last | {"stopped": False, "finished": True, "step": ts.step, "run_dir": str(run_dir)}


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
            self.bar.console.print(text, markup=False, highlight=False, soft_wrap=True)  # paths stay whole

    def close(self) -> None:
        self.bar.stop()


def main(argv: list[str] | None = None) -> None:
    try:
        config = parse_args(argv)  # validated before any process group, data or model exists
        result = train(config)
    except UnetsegError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        from unetseg.distributed import end_process_group

        end_process_group()
    sys.exit(0 if result else 1)



if __name__ == "__main__":
    main()
