"""Optimisers and learning-rate schedules, and how to step them under Accelerate.

One schedule step per optimiser step
------------------------------------
Every schedule here is a function of the number of *optimiser steps* taken so far,
``total_steps`` counts optimiser steps, and the scheduler must be stepped exactly
once per optimiser step that really updated the weights — whatever the number of
processes and the gradient accumulation.

**Do not pass the scheduler to** ``accelerator.prepare``. In Accelerate 1.15 the
``AcceleratedScheduler`` that ``prepare`` returns (``accelerate/scheduler.py``), with
the default ``Accelerator(step_scheduler_with_optimizer=True, split_batches=False)``,
calls the wrapped scheduler's ``step()`` ``num_processes`` times per optimiser step
(its reasoning: each process drew its own batch, so the schedule should be written
in single-process batches). With 2 processes a schedule meant for N steps would be
used up after N/2. On the micro-steps of gradient accumulation
(``sync_gradients`` false) it does not step the schedule at all, and it does not
step it when the optimiser step was skipped (fp16 overflow); so with accumulation
it still makes ``num_processes`` schedule steps per optimiser step.
``tests/test_optim.py`` runs this on 1 and 2 processes and checks it.

So keep the scheduler out of ``prepare`` and step it yourself, once per optimiser
step. ``unetseg.train`` steps it after every optimiser step it counts, including one
skipped for a non-finite loss, so the lr is a pure function of the step number
(``lr_at``) and resume needs nothing but that number: it builds the scheduler from the
resumed config and puts it at the checkpoint's step (``unetseg.train.schedule_at``), so a
resume with another lr or a longer schedule trains with it. Nothing of the scheduler is
saved, nor registered with ``accelerator.register_for_checkpointing`` (whose loader
unpickles with ``weights_only=False``). A loop written around ``accelerator.accumulate`` can use
:func:`step_scheduler`, which steps only after a real optimiser step::

    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = build_scheduler(optimizer, "poly", total_steps=total, warmup_steps=...)
    for batch in batches:
        with accelerator.accumulate(model):
            loss = loss_fn(model(batch["image"]), batch["mask"])
            accelerator.backward(loss)
            optimizer.step()
            step_scheduler(scheduler, accelerator)  # steps only after a real optimiser step
            optimizer.zero_grad()

Schedules
---------
``lr_at(step)`` is the learning rate that the optimiser step number ``step``
(counting from 0) uses: right after :func:`build_scheduler` the optimiser holds
``lr_at(0)``, and after ``k`` calls of ``scheduler.step()`` it holds ``lr_at(k)``.
With ``W = warmup_steps``, ``T = total_steps``, ``m = min_lr_ratio``, ``t = step - W``
and ``p = min(t / (T - W), 1)``:

- warmup (every schedule, ``step < W``): ``factor = (step + 1) / (W + 1)``, a straight
  line from ``1/(W+1)`` at step 0 that reaches the base lr exactly at step ``W``, the
  first step after warmup;
- ``poly`` (default): ``m + (1 - m) * (1 - p) ** power`` — the base lr at step ``W``,
  ``min_lr_ratio * lr`` at step ``T`` and after;
- ``cosine``: ``m + (1 - m) * (1 + cos(pi * p)) / 2``, same end points;
- ``onecycle``: a linear rise over the first ``floor(0.3 * T)`` steps (or over
  ``warmup_steps`` when that is given) to the peak, the base lr, then a cosine anneal
  to ``min_lr_ratio * lr`` at step ``T``: the cosine schedule with a warmup sized as a
  fraction of the run. Unlike :class:`torch.optim.lr_scheduler.OneCycleLR` the rise is
  linear from ~0, momentum is not cycled, and the floor is ``min_lr_ratio`` (default 0);
- ``cyclic``: triangular: from the base lr at step ``W`` linearly down to
  ``min_lr_ratio * lr`` in ``max(1, (T - W) // 4)`` steps, back up in as many, and so
  on: two full cycles over the run (continuing past ``T``);
- ``constant``: the base lr after warmup.

The scheduler is a plain :class:`torch.optim.lr_scheduler.LambdaLR` whose factor is
:meth:`LRSchedule.factor`; its state dict holds the step count and base lrs only (the
schedule itself comes from the configuration, not from the checkpoint).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from unetseg.errors import UnetsegError

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "LRSchedule",
    "build_optimizer",
    "build_scheduler",
    "lr_at",
    "lr_factor",
    "param_groups",
    "step_scheduler",
]

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("poly", "cosine", "onecycle", "cyclic", "constant")
# onecycle without warmup_steps rises over this fraction of the run.
ONECYCLE_RISE = 0.3


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------- optimisers


def pretrained_encoder(model: nn.Module) -> nn.Module | None:
    """The pretrained encoder inside ``model`` (a model's ``pretrained_encoder()``, looked
    for through wrappers such as deep supervision's), or None."""
    for module in model.modules():
        if callable(getattr(module, "pretrained_encoder", None)):
            return module.pretrained_encoder()
    return None


def param_groups(params_or_model: nn.Module | Iterable[Any], weight_decay: float,
                 encoder_lr: float | None = None) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed and a non-decayed group.

    Parameters with more than one dimension (convolution and linear weights) are
    decayed; those with one or none (biases, and the weights of normalisation
    layers such as BatchNorm / GroupNorm / LayerNorm) get ``weight_decay=0``: decaying
    them pulls the normalisation scale towards 0 and helps nothing. Frozen
    parameters (``requires_grad=False``) are left out; empty groups are dropped.
    Given param-group dicts, they are returned as they are.

    With ``encoder_lr`` and a model with a pretrained encoder, the encoder's parameters
    form two groups of their own (marked ``"encoder": True``) at that lr, after the others:
    the first group, whose lr the log shows, is the decoder's.
    """
    if isinstance(params_or_model, nn.Module):
        encoder = pretrained_encoder(params_or_model) if encoder_lr is not None else None
        if encoder is not None:
            inside = {id(p) for p in encoder.parameters()}
            rest = [p for p in params_or_model.parameters() if id(p) not in inside and p.requires_grad]
            own = [p for p in encoder.parameters() if p.requires_grad]
            groups = param_groups(rest, weight_decay) if rest else []
            for group in param_groups(own, weight_decay):
                groups.append({**group, "lr": encoder_lr, "encoder": True, "name": "encoder_" + group["name"]})
            return groups
        params = [p for p in params_or_model.parameters() if p.requires_grad]
    else:
        params = list(params_or_model)
        if params and all(isinstance(p, dict) for p in params):
            return params
        params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise UnetsegError("optimizer: the model has no trainable parameters. Fix: unfreeze at least one layer")
    return groups


def build_optimizer(
    params_or_model: nn.Module | Iterable[Any],
    name: str = "adamw",
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    momentum: float = 0.9,
    nesterov: bool = False,
    encoder_lr_mult: float = 1.0,
) -> torch.optim.Optimizer:
    """An ``adamw`` (default), ``adam`` or ``sgd`` optimiser over :func:`param_groups`.

    Weight decay applies to parameters with more than one dimension only (no decay
    on biases and normalisation weights). For ``adamw`` it is decoupled (AdamW); for
    ``adam`` and ``sgd`` it is torch's L2 penalty added to the gradient. ``betas`` and
    ``eps`` are for the Adam family, ``momentum`` and ``nesterov`` for ``sgd``. A model with
    a pretrained encoder has it in groups of their own at ``lr * encoder_lr_mult``.

    Fused: one kernel per step for all parameters (CPU and CUDA), and a device-side
    ``found_inf`` that skips a step without the host waiting for the device
    (:func:`unetseg.train.optimizer_step`).

    Raises:
        UnetsegError: an unknown name or an out-of-range value, naming it and the fix.
    """
    if name not in OPTIMIZERS:
        raise UnetsegError(f"optimizer: unknown name {name!r}. Fix: use one of {', '.join(OPTIMIZERS)}")
    if not (_is_number(lr) and lr > 0):
        raise UnetsegError(f"optimizer: learning rate {lr!r} must be a finite number > 0. Fix: use e.g. 1e-3")
    if not (_is_number(weight_decay) and weight_decay >= 0):
        raise UnetsegError(f"optimizer: weight_decay {weight_decay!r} must be a finite number >= 0. Fix: use e.g. 1e-4, or 0")
    if not (_is_number(encoder_lr_mult) and encoder_lr_mult >= 0):
        raise UnetsegError(f"optimizer: encoder_lr_mult {encoder_lr_mult!r} must be a finite number >= 0. Fix: use e.g. 0.1")
    groups = param_groups(params_or_model, weight_decay, lr * encoder_lr_mult)
    if name == "sgd":
        if not (_is_number(momentum) and momentum >= 0):
            raise UnetsegError(f"optimizer: momentum {momentum!r} must be a finite number >= 0. Fix: use e.g. 0.9")
        if nesterov and momentum == 0:
            raise UnetsegError("optimizer: nesterov needs a momentum > 0, got momentum 0. Fix: set momentum (e.g. 0.9) or turn nesterov off")
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=bool(nesterov), weight_decay=weight_decay,
                               fused=True)
    betas = tuple(betas)
    if len(betas) != 2 or not all(_is_number(b) and 0 <= b < 1 for b in betas):
        raise UnetsegError(f"optimizer: betas {betas!r} must be two numbers in [0, 1). Fix: use e.g. (0.9, 0.999)")
    if not (_is_number(eps) and eps > 0):
        raise UnetsegError(f"optimizer: eps {eps!r} must be a finite number > 0. Fix: use e.g. 1e-8")
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return cls(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)


# --------------------------------------------------------------------------- schedules


@dataclass(frozen=True)
class LRSchedule:
    """A learning-rate schedule as a pure function of the optimiser step (see the module doc).

    Construction validates every value and raises :class:`UnetsegError` naming it.
    """

    name: str = "poly"
    total_steps: int = 1
    warmup_steps: int = 0
    power: float = 0.9
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        def fail(what: str, fix: str) -> UnetsegError:
            return UnetsegError(f"lr schedule {self.name!r}: {what}. Fix: {fix}")

        if self.name not in SCHEDULES:
            raise UnetsegError(f"lr schedule: unknown name {self.name!r}. Fix: use one of {', '.join(SCHEDULES)}")
        if not (_is_int(self.total_steps) and self.total_steps >= 1):
            raise fail(f"total_steps {self.total_steps!r} must be an integer >= 1", "train for at least one optimiser step")
        if not (_is_int(self.warmup_steps) and self.warmup_steps >= 0):
            raise fail(f"warmup_steps {self.warmup_steps!r} must be an integer >= 0", "use e.g. 0 or 500")
        if self.warmup_steps >= self.total_steps:
            raise fail(
                f"warmup_steps {self.warmup_steps} is not less than total_steps {self.total_steps}",
                "lower the warmup steps or train for more steps",
            )
        if not (_is_number(self.power) and self.power > 0):
            raise fail(f"power {self.power!r} must be a finite number > 0", "use e.g. 0.9")
        if not (_is_number(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1):
            raise fail(f"min_lr_ratio {self.min_lr_ratio!r} must be a number in [0, 1]", "use e.g. 0 or 0.01")

    @property
    def rise_steps(self) -> int:
        """Steps of linear warmup: ``warmup_steps``, or for ``onecycle`` without it ``floor(0.3 * total_steps)``."""
        if self.name == "onecycle" and self.warmup_steps == 0:
            return math.floor(ONECYCLE_RISE * self.total_steps)
        return self.warmup_steps

    @property
    def half_cycle(self) -> int:
        """Steps from the top of a ``cyclic`` triangle to its bottom: two cycles per run."""
        return max(1, (self.total_steps - self.rise_steps) // 4)

    def factor(self, step: int) -> float:
        """The multiple of the base lr used by optimiser step ``step`` (0-based)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        warmup = self.rise_steps
        if step < warmup:
            return (step + 1) / (warmup + 1)
        t = step - warmup
        low = self.min_lr_ratio
        if self.name == "constant":
            return 1.0
        if self.name == "cyclic":
            half = self.half_cycle
            x = t % (2 * half)
            descent = x / half if x <= half else (2 * half - x) / half
            return 1.0 - (1.0 - low) * descent
        p = min(t / (self.total_steps - warmup), 1.0)
        if self.name == "poly":
            return low + (1.0 - low) * (1.0 - p) ** self.power
        # cosine and onecycle
        return low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * p))

    def lr_at(self, step: int, base_lr: float) -> float:
        """The learning rate of optimiser step ``step`` for a base lr ``base_lr``."""
        return base_lr * self.factor(step)


def lr_factor(step: int, name: str = "poly", **kwargs: Any) -> float:
    """:meth:`LRSchedule.factor` of ``LRSchedule(name, **kwargs)`` (``total_steps=`` required)."""
    return LRSchedule(name=name, **kwargs).factor(step)


def lr_at(step: int, base_lr: float, name: str = "poly", **kwargs: Any) -> float:
    """Closed form of the lr that :func:`build_scheduler` gives optimiser step ``step``."""
    return LRSchedule(name=name, **kwargs).lr_at(step, base_lr)


def _factor(schedule: LRSchedule, step: int) -> float:
    return schedule.factor(step)


def _frozen_factor(schedule: LRSchedule, frozen_steps: int, step: int) -> float:
    return 0.0 if step < frozen_steps else schedule.factor(step)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str = "poly",
    *,
    total_steps: int,
    warmup_steps: int = 0,
    power: float = 0.9,
    min_lr_ratio: float = 0.0,
    encoder_freeze_steps: int = 0,
) -> LambdaLR:
    """A ``LambdaLR`` over ``optimizer`` following :class:`LRSchedule` (see the module doc).

    ``total_steps`` counts optimiser steps: for ``unetseg train``, ``epochs`` times the
    optimiser steps of an epoch, which :func:`unetseg.stream.batches_per_epoch` trims to
    whole steps (the batches of an epoch divided by the gradient accumulation, no
    remainder). Step it once per optimiser step yourself (see the module doc), and do
    not pass it to ``accelerator.prepare``.
    Each param group's lr at construction is its base lr. The groups of a pretrained
    encoder (``"encoder": True``) get lr 0 for their first ``encoder_freeze_steps`` steps,
    then the schedule: the encoder is frozen while the decoder learns (its BatchNorm
    statistics still follow the data, and its Adam moments gather the gradients).
    """
    schedule = LRSchedule(name=name, total_steps=total_steps, warmup_steps=warmup_steps, power=power,
                          min_lr_ratio=min_lr_ratio)
    # A partial, not a lambda or a bound method: LambdaLR.state_dict() stores the
    # __dict__ of callable objects, which for a partial is empty.
    factor = functools.partial(_factor, schedule)
    if encoder_freeze_steps > 0:
        frozen = functools.partial(_frozen_factor, schedule, encoder_freeze_steps)
        return LambdaLR(optimizer, [frozen if g.get("encoder") else factor for g in optimizer.param_groups])
    return LambdaLR(optimizer, factor)


def step_scheduler(scheduler: Any, accelerator: Any) -> bool:
    """Step ``scheduler`` once if the optimiser has just really stepped; return whether it did.

    Call it right after ``optimizer.step()``, inside ``accelerator.accumulate(...)``.
    It does nothing on gradient-accumulation micro-steps (``accelerator.sync_gradients``
    is False: the prepared optimiser did not step) and when the optimiser step was
    skipped (``accelerator.optimizer_step_was_skipped``, an fp16 overflow), and steps
    once — not once per process — otherwise.

    Raises:
        TypeError: ``scheduler`` came out of ``accelerator.prepare`` (an
            ``AcceleratedScheduler``, which steps ``num_processes`` times per call).
    """
    from accelerate.scheduler import AcceleratedScheduler

    if isinstance(scheduler, AcceleratedScheduler):
        raise TypeError(
            "step_scheduler: the scheduler was passed to accelerator.prepare, whose AcceleratedScheduler steps it "
            "once per process per optimiser step; build it with build_scheduler and keep it out of prepare"
        )
    if not accelerator.sync_gradients or accelerator.optimizer_step_was_skipped:
        return False
    scheduler.step()
    return True
