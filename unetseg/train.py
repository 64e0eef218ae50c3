"""Train a segmentation model: ``python -m unetseg.train``, ``accelerate launch -m
unetseg.train`` (any number of processes, GPUs or CPU) and ``unetseg train`` are this one
entry point.

Read it bottom up from :func:`train` and :func:`loop`: :func:`setup` builds a :class:`Run`
(accelerator, data, model, optimiser, schedule, loss, and the step to resume from);
:func:`train_step` takes one optimiser step over ``grad_accum`` micro-batches;
evaluation every ``eval_every`` steps is :class:`~unetseg.validation.Validation`'s, the
log :class:`~unetseg.tracking.Reporter`'s; :func:`save` checkpoints every ``save_every``
steps.
SIGTERM/SIGINT stop the loop cleanly after the optimiser step in progress. The run dir gets
``config.yaml``, ``dataset.json``, ``metrics.jsonl``, ``sessions.jsonl`` (each start and
end: command, time, hardware), ``checkpoints/``, ``best/`` and ``final/``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from unetseg.checkpoint import WEIGHTS_FILE, load_checkpoint
from unetseg.config import TrainConfig
from unetseg.errors import UnetsegError
from unetseg.flags import parse_args
from unetseg.runstate import TrainerState, read_jsonl
from unetseg.runtime import StopFlag, compiled
from unetseg.tracking import pct

if TYPE_CHECKING:
    from unetseg.tracking import Reporter

# --- set-up ------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything :func:`setup` builds; the loop and its pieces read it."""

    config: TrainConfig
    accelerator: Any
    run_dir: Path
    resume_from: Path | None
    state: TrainerState
    data: Any
    """The :class:`~unetseg.train_data.TrainData`."""
    net: torch.nn.Module
    """The model itself: evaluated and saved."""
    model: torch.nn.Module
    """What is trained (``net``, with deep supervision's heads when on), as Accelerate prepared
    it (DDP on several processes)."""
    forward: Callable[[torch.Tensor], torch.Tensor]
    """``model``, or ``torch.compile(model)``."""
    optimizer: Any
    scheduler: Any
    loss_fn: torch.nn.Module
    hook: Callable[[dict[str, Any]], dict[str, Any]]
    """The device-side batch hook (:class:`~unetseg.batch.BatchHook`), for training and validation."""
    eval_model: torch.nn.Module
    """What validation runs: ``net``, or ``net`` compiled over batches of one shape."""
    total_steps: int
    eval_every: int
    save_every: int
    tracker: tuple[str | None, dict[str, Any]] = (None, {})
    """``log_with`` and ``init_kwargs`` of the tracker, started once the resume point is known."""
    guard: StepGuard | None = None
    """The agreement after each backward and the count of skipped steps (:class:`StepGuard`)."""

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def saved_config(self) -> dict[str, Any]:
        """The config saved with every model: the model section holds the built options."""
        options = self.net_options
        mean, std = options.normalization()  # recorded, so the saved model needs no lookup
        return {**self.config.to_dict(), "model": {**options.to_dict(), "mean": list(mean), "std": list(std)}}

    @property
    def net_options(self):
        return net_options(self.config, self.data)


def net_options(config: TrainConfig, data):
    """The model's options as built: the config's, with the data's number of classes."""
    num_classes = data.classes.num_classes
    if config.model.num_classes not in (None, num_classes):
        raise UnetsegError(f"model.num_classes {config.model.num_classes}: the data has {num_classes} classes. "
                           "Fix: leave model.num_classes out of the config (it is taken from dataset.json)")
    return config.model.model_copy(update={"num_classes": num_classes})


def start_accelerator(config: TrainConfig, run_dir: Path, resumed: TrainerState | None):
    """The accelerator, with the tracker (resuming the run's own W&B run on resume)."""
    from accelerate.utils import ProjectConfiguration

    from unetseg.runtime import make_accelerator
    from unetseg.tracking import tracker_setup

    rc = config.run
    log_with, init_kwargs = tracker_setup(rc.tracker, run_dir, rc.run_name or run_dir.name,
                                          resumed.tracker_run_id if resumed else None)
    accelerator = make_accelerator(
        rc.mixed_precision, log_with=log_with, step_scheduler_with_optimizer=False,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
    )
    return accelerator, (log_with, init_kwargs)


def build_model(config: TrainConfig, accelerator, data, total_steps: int,
                resuming: bool = False) -> tuple[torch.nn.Module, torch.nn.Module, Callable, Any, Any]:
    """The model (identical initial weights on every rank), its optimiser and schedule. A
    resume builds it without fetching pretrained weights: the checkpoint's come next."""
    from accelerate.utils import set_seed

    from unetseg.deep_supervision import supervised
    from unetseg.models import build_model as build
    from unetseg.optim import build_optimizer, build_scheduler
    from unetseg.runtime import channels_last, compiled
    from unetseg.stream import derive_seed

    oc, rc = config.optim, config.run
    set_seed(rc.seed)  # the same on every rank: identical initial weights
    options = net_options(config, data)
    net = build(options.for_saved_weights() if resuming else options)
    trained = supervised(net, config.loss.deep_supervision, data.classes.num_classes)  # net, or net with aux heads
    # From here on each rank draws its own random numbers (dropout masks differ across ranks).
    set_seed(derive_seed(rc.seed, accelerator.process_index, 2))
    if rc.sync_bn and accelerator.num_processes > 1:
        trained = torch.nn.SyncBatchNorm.convert_sync_batchnorm(trained)  # in place: net is converted too
    if channels_last(config, accelerator.device):
        trained = trained.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(trained, oc.optimizer, lr=oc.lr, weight_decay=oc.weight_decay, betas=tuple(oc.betas),
                                eps=oc.eps, momentum=oc.momentum, nesterov=oc.nesterov, encoder_lr_mult=oc.encoder_lr_mult)
    # Kept out of accelerator.prepare, whose wrapper steps it once per process per step.
    scheduler = build_scheduler(optimizer, oc.scheduler, total_steps=total_steps, warmup_steps=oc.warmup_steps,
                                power=oc.power, min_lr_ratio=oc.min_lr_ratio, encoder_freeze_steps=oc.encoder_freeze_steps)
    model, optimizer = accelerator.prepare(trained, optimizer)
    # Every training batch has one shape (full batches of one crop size): one static graph,
    # rather than a second compile that makes the sizes symbolic (slower kernels).
    forward = torch.compile(model, dynamic=False) if compiled(config, accelerator.device) else model
    return net, model, forward, optimizer, scheduler


def check_batch_norm(config: TrainConfig, net: torch.nn.Module, data, world: int) -> None:
    """Refuse, before anything is written, a batch whose deepest feature map leaves batch
    norm one value per channel: training would crash at its first step ("Expected more than
    1 value per channel"). Each process normalises its own batch (all of them with sync_bn)."""
    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules()):
        return
    h, w = data.train_tf.resize or data.train_tf.crop
    multiple = getattr(net, "pad_multiple", 1)  # the input is padded to it, then halved down to 1/multiple
    deepest = -(-h // multiple), -(-w // multiple)
    batch = config.data.batch_size * (world if config.run.sync_bn and world > 1 else 1)
    if batch * deepest[0] * deepest[1] > 1:
        return
    size = "--resize" if config.data.resize else "--crop-size"
    raise UnetsegError(
        f"batch norm over a batch of {batch} image(s) of {h}x{w}: the model's deepest feature map is "
        f"{deepest[0]}x{deepest[1]} (the input divided by {multiple}), one value per channel to normalise, and "
        f"training would fail at its first step. Fix: --model-norm group (it needs no batch), a --batch-size of 2 "
        f"or more, a {size} larger than {multiple} on a side, or a smaller --model-depth"
    )


# Validation sizes up to which cuDNN's autotuner pays for itself in eager evaluation: each new
# input shape is benchmarked once, then cached.
AUTOTUNE_MAX_EVAL_SIZES = 4


def autotune_convolutions(config: TrainConfig, data, device: torch.device) -> bool:
    """Turn on ``torch.backends.cudnn.benchmark`` on CUDA when the shapes repeat: training
    batches always have one shape (full batches of crops of one size); validation has one
    when it is compiled (padded to one shape), resized, or the split holds few image sizes.
    Returns whether it is on. Left as it was on other devices, and for a validation split of
    many sizes, where each would be autotuned anew."""
    if device.type != "cuda":
        return False
    sizes = data.val.info.split(data.val.split).shapes()
    repeats = compiled(config, device) or config.data.eval_resize is not None or len(sizes) <= AUTOTUNE_MAX_EVAL_SIZES
    if repeats:
        torch.backends.cudnn.benchmark = True
    return repeats


def build_loss(config: TrainConfig, data, device) -> torch.nn.Module:
    """The loss; padding and ignored pixels carry ``classes.ignore_label``, also when the
    dataset has no ignore_index."""
    from unetseg.class_weights import class_weights
    from unetseg.deep_supervision import DeepSupervisionLoss
    from unetseg.losses import SegmentationLoss

    spec = config.loss.class_weights
    weights = class_weights([float(v) for v in spec.split(",")] if "," in spec else spec,
                            data.train.pixel_counts())
    lc = config.loss
    loss = SegmentationLoss(lc.loss, data.classes.ignore_label, weights, lc.label_smoothing, lc.dice_weight,
                            ohem_threshold=lc.ohem_threshold, ohem_min_kept=lc.ohem_min_kept)
    return (DeepSupervisionLoss(loss, lc.deep_supervision) if lc.deep_supervision > 0 else loss).to(device)


def setup(config: TrainConfig) -> Run:
    """Build the run, on every rank the same way, and load the checkpoint to resume from."""
    from unetseg.runstate import check_setup, choose_start, run_setup
    from unetseg.runtime import check_sync_bn, process_state
    from unetseg.train_data import batch_hook, open_train_data
    from unetseg.validation import eval_model

    rc = config.run
    check_sync_bn(rc.sync_bn, process_state())
    run_dir, resume_from = choose_start(config)
    resumed = TrainerState.load(resume_from) if resume_from else None
    accelerator, tracker = start_accelerator(config, run_dir, resumed)
    data = open_train_data(config, accelerator)
    total_steps = rc.max_steps or rc.epochs * data.steps_per_epoch
    net, model, forward, optimizer, scheduler = build_model(config, accelerator, data, total_steps, resume_from is not None)
    check_batch_norm(config, net, data, accelerator.num_processes)
    autotune_convolutions(config, data, accelerator.device)
    eval_every = rc.eval_every or data.steps_per_epoch
    setup_now = run_setup(config, accelerator.num_processes, data.train, net_options(config, data).to_dict())
    run = Run(config, accelerator, run_dir, resume_from, resumed or TrainerState(setup=setup_now), data, net, model, forward,
              optimizer, scheduler, build_loss(config, data, accelerator.device),
              batch_hook(config, accelerator.device, data),
              eval_model(config, accelerator.device, net, data), total_steps, eval_every, rc.save_every or eval_every, tracker)
    run.guard = StepGuard(accelerator.device, accelerator.num_processes, run.state.nonfinite_streak, run.state.step)
    if resume_from:
        check_schedule_length(run)
    if resume_from and not (finished(run) and (run_dir / "final" / WEIGHTS_FILE).is_file()):
        check_setup(run.state.setup, setup_now, resume_from)
        load_resumed(run)
    return run


def load_resumed(run: Run) -> None:
    """Weights, optimiser moments, RNG states and the data position from the checkpoint;
    every optimiser hyperparameter and the lr schedule from the config, at the resumed step.

    What a resume may change is what a step's update is a pure function of: the lr, the
    schedule (its name, warmup, power, floor and length: ``--max-steps``/``--epochs``, so a
    finished run can be extended), weight decay, betas, eps, momentum, nesterov, gradient
    clipping, the loss and the evaluation and saving cadence. Each step after the resume
    trains as the new config says that step trains; the steps before stay as they were.
    What the data order or the checkpoint's shape depends on is refused by
    :func:`~unetseg.runstate.check_setup`, the optimiser's name among it."""
    # The optimiser was built from the config: keep its hyperparameters over the checkpoint's.
    hyper = [{k: v for k, v in group.items() if k != "params"} for group in run.optimizer.param_groups]
    load_checkpoint(run.accelerator, run.resume_from)
    for group, values in zip(run.optimizer.param_groups, hyper, strict=True):
        group.update(values)
        if group.get("fused"):  # a checkpoint of an unfused optimiser keeps its step counts on the host
            for param in group["params"]:
                state = run.optimizer.state.get(param, {})
                if "step" in state:
                    state["step"] = state["step"].to(param.device, torch.float32)
    schedule_at(run.scheduler, run.state.step)


def schedule_at(scheduler: Any, step: int) -> None:
    """Put a freshly built ``LambdaLR`` at optimiser step ``step``: every param group then
    holds ``base_lr * factor(step)``, the lr its next step uses, as if the schedule had been
    stepped ``step`` times (the lr is a function of the step alone, :mod:`unetseg.optim`)."""
    lrs = [base * factor(step) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    scheduler.load_state_dict({**scheduler.state_dict(), "last_epoch": step, "_step_count": step + 1, "_last_lr": lrs})
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr


def check_schedule_length(run: Run) -> None:
    """A resume may lengthen the schedule, or shorten it down to the step the run is at."""
    step, total = run.state.step, run.total_steps
    if step > total:
        rc = run.config.run
        asked = f"--max-steps {rc.max_steps}" if rc.max_steps else f"--epochs {rc.epochs} ({total} steps)"
        raise UnetsegError(
            f"cannot resume from {run.resume_from}: the run is at step {step}, past the {asked} asked for now. "
            f"Fix: ask for at least {step} steps (e.g. --max-steps {step} to end it there), or start a new run "
            "in another --output-dir"
        )


def finished(run: Run) -> bool:
    """Resumed after its last step, with nothing left to evaluate."""
    return run.resume_from is not None and run.state.step >= run.total_steps and not run.state.pending_eval


def start_reporting(run: Run) -> None:
    """The run dir's files, the banner, and the tracker (after the resume point is known)."""
    from unetseg.models import describe_model
    from unetseg.runstate import append_jsonl, session_record, truncate_metrics, write_run_files
    from unetseg.runtime import channels_last, compiled
    from unetseg.tracking import flat_config

    config, accelerator, ts = run.config, run.accelerator, run.state
    if run.main:
        write_run_files(run.run_dir, config, run.data.info, ts.step if run.resume_from else None)
        truncate_metrics(run.run_dir / "metrics.jsonl", ts.step, ts.pending_eval)
        append_jsonl(run.run_dir / "sessions.jsonl", session_record(accelerator, ts.step, run.resume_from))
        world, dc = accelerator.num_processes, config.data
        print(config.to_yaml(), end="")
        print(f"{describe_model(run.net)}; {world} process(es) on {accelerator.device.type}, mixed precision "
              f"{accelerator.mixed_precision}{', channels_last' if channels_last(config, accelerator.device) else ''}"
              f"{', compiled' if compiled(config, accelerator.device) else ''}, augmentation "
              f"{'in loader workers' if run.data.augment_on == 'workers' else 'on ' + accelerator.device.type}; "
              f"{run.total_steps} steps of {dc.batch_size} x {world} x {config.optim.grad_accum} images "
              f"({run.data.steps_per_epoch} per epoch); run dir {run.run_dir}"
              + (f"; resuming from {run.resume_from} at step {ts.step}" if run.resume_from else ""), flush=True)
        from unetseg.runtime import slow_bf16_warning

        warning = slow_bf16_warning(accelerator.mixed_precision, accelerator.device)
        if warning:
            print(warning, flush=True)
    log_with, init_kwargs = run.tracker
    if log_with:
        accelerator.init_trackers(config.run.project, config=flat_config(config.to_dict()), init_kwargs=init_kwargs)
        if run.main and config.run.tracker == "wandb":
            ts.tracker_run_id = accelerator.get_tracker("wandb", unwrap=True).id


# --- the step ----------------------------------------------------------------------------


def train_step(run: Run, batches: Iterator[dict[str, Any]], stop: StopFlag, losses: list[torch.Tensor]) -> tuple[float, bool]:
    """One optimiser step over ``grad_accum`` micro-batches (skipped when any rank's loss is
    not finite); returns the step's learning rate and whether a stop was requested.

    Nothing here waits for the device on a single process: the finiteness of the loss stays
    a device tensor, and the fused optimiser skips its update on it (as it does for a
    GradScaler's overflow). Several processes agree on it and on a stop with one tiny
    all-reduce per optimiser step, read once: the only sync. Every rank runs backward on
    every micro-batch, finite or not, so no rank can leave the others waiting in the
    gradient all-reduce."""
    accelerator, accum, ts = run.accelerator, run.config.optim.grad_accum, run.state
    bad = None  # a device bool: some micro-batch's loss was not finite
    for micro in range(accum):
        batch = run.hook(next(batches))
        # Gradients are all-reduced on the last micro-batch only.
        sync = contextlib.nullcontext() if micro == accum - 1 else accelerator.no_sync(run.model)
        with sync:
            with accelerator.autocast():
                loss = run.loss_fn(run.forward(batch["image"]), batch["mask"])
            accelerator.backward(loss / accum)
        loss = loss.detach().float()
        losses.append(loss)
        bad = ~torch.isfinite(loss) if bad is None else bad | ~torch.isfinite(loss)
    skip, stopped = run.guard.agree(bad, stop.requested)
    if run.config.optim.grad_clip > 0:
        accelerator.clip_grad_norm_(run.model.parameters(), run.config.optim.grad_clip)
    optimizer_step(run.optimizer, skip)
    run.optimizer.zero_grad(set_to_none=True)
    # The lr is a function of the step count alone: the schedule steps on every step.
    lr = run.scheduler.get_last_lr()[0]
    run.scheduler.step()
    ts.step += 1
    run.guard.count(skip)
    return lr, stopped


def optimizer_step(optimizer: Any, skip: torch.Tensor) -> None:
    """Step ``optimizer`` unless ``skip`` (a device bool) holds. A fused optimiser reads it on
    the device (its ``found_inf``, which leaves weights, moments and step count as they were);
    any other reads it here, one sync per step. Under fp16 the GradScaler sets its own
    ``found_inf`` from the gradients, which a non-finite loss makes non-finite too."""
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds the torch optimiser
    if all(group.get("fused") for group in inner.param_groups):
        inner.grad_scale, inner.found_inf = None, skip.float()
        optimizer.step()
    elif not bool(skip):
        optimizer.step()


class StepGuard:
    """What the ranks agree on after each step's backward (a non-finite loss, a stop), and the
    steps skipped for a non-finite loss, counted on the device; :meth:`settle` reads the
    count (when the loop logs or saves) and stops a run that keeps failing."""

    def __init__(self, device: torch.device, world: int, streak: int, step: int):
        self.world, self.since = world, step
        self.streak = torch.tensor(streak, device=device)  # non-finite steps in a row, up to now
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)  # since step ``since``
        # A stop is requested on the host; these stand for it on the device with no copy.
        self.flags = torch.zeros((), device=device), torch.ones((), device=device)

    def agree(self, bad: torch.Tensor, stop: bool) -> tuple[torch.Tensor, bool]:
        """(skip the step, stop after it), the same on every rank."""
        if self.world == 1:
            return bad, stop
        from unetseg.distributed import all_reduce_sum

        agreed = all_reduce_sum(torch.stack([bad.float(), self.flags[stop]]))
        return agreed[0] > 0, bool(agreed[1] > 0)  # the step's one sync

    def count(self, skipped: torch.Tensor) -> None:
        self.streak = torch.where(skipped, self.streak + 1, 0)
        self.skipped += skipped

    def settle(self, run: Run) -> None:
        """Warn of the steps skipped since the last call, keep the streak in the trainer
        state (for the checkpoint), and stop after ``max_nonfinite`` in a row."""
        streak, skipped = torch.stack([self.streak, self.skipped]).tolist()
        ts, max_nonfinite = run.state, run.config.run.max_nonfinite
        ts.nonfinite_streak = streak
        if skipped and run.main:
            print(f"warning: non-finite loss in {skipped} of the {ts.step - self.since} steps up to step {ts.step}, "
                  f"each skipped ({streak} in a row now; the run stops at {max_nonfinite})", flush=True)
        self.skipped.zero_()
        self.since = ts.step
        if streak and streak >= max_nonfinite:
            raise UnetsegError(
                f"{streak} non-finite losses in a row (steps {ts.step - streak + 1} to {ts.step}). Fix: lower --lr, "
                "add --warmup-steps or --grad-clip 1.0, or use --mixed-precision bf16 instead of fp16"
            )


# --- checkpoints -------------------------------------------------------------------------


def save(run: Run) -> None:
    from unetseg.checkpoint import save_checkpoint

    run.guard.settle(run)  # the streak, as the checkpoint records it
    save_checkpoint(run.accelerator, run.run_dir, run.state.step, run.state.__dict__.copy(),
                    run.config.run.keep_checkpoints)


# --- the loop ----------------------------------------------------------------------------


def train(config: TrainConfig, batches: Iterator[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Train as ``config`` says; returns the final evaluation metrics (and ``stopped``).

    ``batches`` replaces the training stream (each a dict with ``image`` and ``mask``
    tensors), e.g. in-memory data for ``benchmarks/train_step.py``; the classes and the
    validation split still come from ``config.data``."""
    stop = StopFlag()
    stop.install()  # from the start: a stop during set-up is honoured after the first step
    try:
        run = setup(config)
    except BaseException:
        from unetseg.runtime import process_state

        process_state().destroy_process_group()  # else gloo may abort at exit on several processes
        raise
    try:
        if finished(run):  # resubmitted after its last step: nothing left but final/ (when a stop came first)
            return finished_run(run)
        return loop(run, stop, batches)
    finally:
        run.accelerator.end_training()


def loop(run: Run, stop: StopFlag, batches: Iterator[dict[str, Any]] | None) -> dict[str, Any]:
    """The training loop: step, log, evaluate, checkpoint, until the last step or a stop."""
    from unetseg.badsamples import StreamStats
    from unetseg.runstate import record_session_end
    from unetseg.tracking import Reporter
    from unetseg.train_data import train_batches
    from unetseg.validation import Validation

    ts, accelerator = run.state, run.accelerator
    start_reporting(run)
    train_stats = StreamStats(run.config.data.max_bad_samples)
    if batches is None:
        batches = train_batches(run.config, run.data, accelerator.process_index, accelerator.num_processes, ts.step,
                                train_stats)
    validate = Validation(run, stop)
    reporter = validate.reporter = Reporter(run, train_stats)
    last_eval: dict[str, Any] | None = None
    stopped = False
    run.model.train()
    try:
        if ts.pending_eval:  # the evaluation a stop cut short, on the weights it was meant for
            last_eval = validate()
            stopped = last_eval is None
            save(run)  # records that it ran (or, stopped again, that it still has to)
            reporter.restart_clock()  # images/s counts training only
        while ts.step < run.total_steps and not stopped:
            lr, stopped = train_step(run, batches, stop, reporter.losses)
            if reporter.due(stopped):
                run.guard.settle(run)
            reporter.log_step(lr, stopped)
            last_step = ts.step == run.total_steps
            if ts.step % run.data.steps_per_epoch == 0 or last_step:
                reporter.log_epoch()
            if (ts.step % run.eval_every == 0 or last_step) and not stopped:
                last_eval = validate()
                stopped = last_eval is None
                reporter.restart_clock()  # images/s counts training only
            if ts.step % run.save_every == 0 or last_step or stopped:
                save(run)
                reporter.restart_clock()
    finally:
        reporter.close()
    if run.main:
        record_session_end(run.run_dir, ts.step, stopped)
    if stopped:
        if run.main:
            print(f"stopped by {stop.signal or 'a signal on another rank'} at step {ts.step}; "
                  f"continue with --resume auto --output-dir {run.run_dir}", flush=True)
    elif run.main:
        finish(run, reporter, last_eval)
    return (last_eval or {}) | {"stopped": stopped, "step": ts.step, "run_dir": str(run.run_dir)}


def finish(run: Run, reporter: Reporter, last_eval: dict[str, Any] | None) -> None:
    from unetseg.checkpoint import save_model

    ts = run.state
    save_model(run.run_dir / "final", run.net, run.saved_config, run.data.info)
    print(reporter.last_table, flush=True)
    print(f"final val mIoU {pct(last_eval['mIoU'] if last_eval else None)} (best {pct(ts.best_miou)} at step "
          f"{ts.best_step}); models in {run.run_dir / 'best'} and {run.run_dir / 'final'}", flush=True)


def finished_run(run: Run) -> dict[str, Any]:
    """A resumed run whose last checkpoint is its last step: write ``final/`` if a stop
    came before it, and say the run is done."""
    from unetseg.checkpoint import save_model

    run_dir, ts = run.run_dir, run.state
    evals = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "mIoU" in r]
    last = evals[-1] if evals else {}
    if run.main:
        if not (run_dir / "final" / WEIGHTS_FILE).is_file():
            save_model(run_dir / "final", run.net, run.saved_config, run.data.info)
        print(f"{run_dir} already finished at step {ts.step}: final val mIoU {pct(last.get('mIoU'))} "
              f"(best {pct(ts.best_miou)} at step {ts.best_step}); models in {run_dir / 'best'} and "
              f"{run_dir / 'final'}. Nothing to do", flush=True)
    return last | {"stopped": False, "finished": True, "step": ts.step, "run_dir": str(run_dir)}


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
