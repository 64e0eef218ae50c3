"""Optimisers, learning-rate schedules, and stepping them once per optimiser step under Accelerate."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from unetseg.errors import UnetsegError
from unetseg.optim import (
    LRSchedule,
    build_optimizer,
    build_scheduler,
    lr_at,
    lr_factor,
    param_groups,
    step_scheduler,
)

sys.path.insert(0, str(Path(__file__).parent))
from multiproc import run_distributed  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "scripts" / "schedule_worker.py"
BASE_LR = 0.1
TOTAL, WARMUP = 30, 5


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def reference_factor(step: int, name: str, total: int, warmup: int, power=0.9, low=0.0) -> float:
    """The schedules written out again, independently of unetseg.optim, from the module doc."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if name == "constant":
        return 1.0
    t = step - warmup
    if name == "cyclic":
        half = max(1, (total - warmup) // 4)
        phase = t % (2 * half)
        down = phase if phase <= half else 2 * half - phase
        return 1.0 - (1.0 - low) * down / half
    p = min(t / (total - warmup), 1.0)
    if name == "poly":
        return low + (1 - low) * (1 - p) ** power
    return low + (1 - low) * (1 + math.cos(math.pi * p)) / 2  # cosine, onecycle


def run_schedule(steps: int, **kwargs) -> list[float]:
    """The lr of each of ``steps`` optimiser steps, read from the optimiser, for both param groups."""
    optimizer = build_optimizer(tiny_model(), "sgd", lr=BASE_LR)
    scheduler = build_scheduler(optimizer, **kwargs)
    lrs = []
    for _ in range(steps):
        group_lrs = {g["lr"] for g in optimizer.param_groups}
        assert len(group_lrs) == 1, group_lrs  # both groups follow the same schedule
        lrs.append(group_lrs.pop())
        optimizer.step()
        scheduler.step()
    return lrs


# --------------------------------------------------------------------------- schedules


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "poly"},
        {"name": "poly", "power": 2.0, "min_lr_ratio": 0.1},
        {"name": "cosine"},
        {"name": "cosine", "min_lr_ratio": 0.05},
        {"name": "onecycle"},
        {"name": "cyclic", "min_lr_ratio": 0.2},
        {"name": "constant"},
    ],
    ids=lambda k: "-".join(f"{v}" for v in k.values()),
)
def test_scheduler_follows_closed_form(kwargs):
    warmup = 0 if kwargs["name"] == "onecycle" else WARMUP
    steps = TOTAL + 5  # a few past the end as well
    lrs = run_schedule(steps, total_steps=TOTAL, warmup_steps=warmup, **kwargs)
    closed = [lr_at(k, BASE_LR, total_steps=TOTAL, warmup_steps=warmup, **kwargs) for k in range(steps)]
    assert lrs == pytest.approx(closed, rel=1e-12, abs=1e-15)
    # ...and the closed form is the documented formula.
    schedule = LRSchedule(total_steps=TOTAL, warmup_steps=warmup, **kwargs)
    ref = {k: v for k, v in kwargs.items() if k != "name"}
    ref = {"power": ref.get("power", 0.9), "low": ref.get("min_lr_ratio", 0.0)}
    expected = [BASE_LR * reference_factor(k, kwargs["name"], TOTAL, schedule.rise_steps, **ref) for k in range(steps)]
    assert closed == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("name", ["poly", "cosine", "cyclic", "constant"])
def test_warmup_starts_low_and_reaches_base_lr(name):
    lrs = run_schedule(WARMUP + 1, name=name, total_steps=TOTAL, warmup_steps=WARMUP)
    assert lrs[0] == pytest.approx(BASE_LR / (WARMUP + 1))
    assert all(a < b for a, b in zip(lrs, lrs[1:]))  # strictly rising
    assert lrs[WARMUP - 1] < BASE_LR
    assert lrs[WARMUP] == pytest.approx(BASE_LR)


def test_no_warmup_starts_at_base_lr():
    assert run_schedule(1, name="poly", total_steps=TOTAL)[0] == pytest.approx(BASE_LR)


@pytest.mark.parametrize("name", ["poly", "cosine", "onecycle"])
@pytest.mark.parametrize("min_lr_ratio", [0.0, 0.01])
def test_decay_reaches_min_at_total_steps_and_stays(name, min_lr_ratio):
    warmup = 0 if name == "onecycle" else WARMUP
    lrs = run_schedule(TOTAL + 3, name=name, total_steps=TOTAL, warmup_steps=warmup, min_lr_ratio=min_lr_ratio)
    floor = BASE_LR * min_lr_ratio
    assert lrs[TOTAL - 1] > floor  # the last step of the run still learns
    assert lrs[TOTAL:] == pytest.approx([floor] * 3, abs=1e-15)
    peak = LRSchedule(name, total_steps=TOTAL, warmup_steps=warmup).rise_steps
    assert lrs[peak] == pytest.approx(BASE_LR)
    decay = lrs[peak : TOTAL + 1]
    assert all(a > b for a, b in zip(decay, decay[1:]))  # strictly falling from the peak to the floor


def test_onecycle_rise_is_30_percent_of_the_run():
    schedule = LRSchedule("onecycle", total_steps=TOTAL)
    assert schedule.rise_steps == 9  # floor(0.3 * 30)
    assert schedule.lr_at(8, 1.0) == pytest.approx(9 / 10)
    assert schedule.lr_at(9, 1.0) == 1.0  # the peak
    assert LRSchedule("onecycle", total_steps=TOTAL, warmup_steps=4).rise_steps == 4
    # onecycle is cosine with its warmup sized as a fraction of the run
    for k in range(TOTAL + 2):
        assert schedule.factor(k) == lr_factor(k, "cosine", total_steps=TOTAL, warmup_steps=9)


def test_cyclic_is_triangular():
    # 25 steps, 5 of warmup: half cycles of (25 - 5) // 4 = 5 steps, two cycles per run.
    lrs = run_schedule(26, name="cyclic", total_steps=25, warmup_steps=WARMUP, min_lr_ratio=0.5)
    assert lrs[5] == pytest.approx(BASE_LR)  # top after warmup
    assert lrs[10] == pytest.approx(BASE_LR * 0.5)  # bottom after a half cycle
    assert lrs[15] == pytest.approx(BASE_LR)  # back to the top
    assert lrs[20] == pytest.approx(BASE_LR * 0.5)
    assert lrs[7] == pytest.approx(BASE_LR * (1 - 0.5 * 2 / 5))
    assert lrs[13] == pytest.approx(BASE_LR * (1 - 0.5 * 2 / 5))
    assert LRSchedule("cyclic", total_steps=TOTAL, warmup_steps=WARMUP).half_cycle == 6  # (30 - 5) // 4


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"name": "linear", "total_steps": 10}, "'linear'"),
        ({"total_steps": 0}, "total_steps 0"),
        ({"total_steps": 10.5}, "total_steps 10.5"),
        ({"total_steps": 10, "warmup_steps": 10}, "warmup_steps 10 is not less than total_steps 10"),
        ({"total_steps": 10, "warmup_steps": -1}, "warmup_steps -1"),
        ({"total_steps": 10, "power": 0}, "power 0"),
        ({"total_steps": 10, "min_lr_ratio": 1.5}, "min_lr_ratio 1.5"),
    ],
)
def test_schedule_validation_names_value_and_fix(kwargs, needle):
    optimizer = build_optimizer(tiny_model())
    with pytest.raises(UnetsegError, match="Fix:") as info:
        build_scheduler(optimizer, **kwargs)
    assert needle in str(info.value)
    with pytest.raises(UnetsegError):
        lr_at(0, 1.0, **kwargs)


def test_scheduler_state_dict_round_trip():
    def make():
        optimizer = build_optimizer(tiny_model(), "sgd", lr=BASE_LR)
        return optimizer, build_scheduler(optimizer, "cosine", total_steps=TOTAL, warmup_steps=WARMUP)

    optimizer, scheduler = make()
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # plain data only: no pickled schedule or function
    optimizer2, scheduler2 = make()
    scheduler2.load_state_dict(state)
    optimizer2.step()
    scheduler2.step()
    expected = lr_at(8, BASE_LR, "cosine", total_steps=TOTAL, warmup_steps=WARMUP)
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(expected)


# --------------------------------------------------------------------------- step_scheduler


def fake_accelerator(sync_gradients=True, skipped=False):
    return SimpleNamespace(sync_gradients=sync_gradients, optimizer_step_was_skipped=skipped)


def test_step_scheduler_steps_only_after_real_optimizer_steps():
    optimizer = build_optimizer(tiny_model(), "sgd", lr=BASE_LR)
    scheduler = build_scheduler(optimizer, "poly", total_steps=TOTAL)
    assert step_scheduler(scheduler, fake_accelerator(sync_gradients=False)) is False  # accumulation micro-step
    assert step_scheduler(scheduler, fake_accelerator(skipped=True)) is False  # fp16 overflow
    assert scheduler.last_epoch == 0
    optimizer.step()
    assert step_scheduler(scheduler, fake_accelerator()) is True
    assert scheduler.last_epoch == 1
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(1, BASE_LR, total_steps=TOTAL))


def test_step_scheduler_refuses_a_prepared_scheduler():
    from accelerate.scheduler import AcceleratedScheduler

    optimizer = build_optimizer(tiny_model())
    wrapped = AcceleratedScheduler.__new__(AcceleratedScheduler)  # no __init__: no Accelerate singletons here
    wrapped.scheduler = build_scheduler(optimizer, total_steps=TOTAL)
    with pytest.raises(TypeError, match="keep it out of prepare"):
        step_scheduler(wrapped, fake_accelerator())


# --------------------------------------------------------------------------- optimisers


def test_no_weight_decay_on_biases_and_norm_weights():
    model = tiny_model()
    model[0].weight.requires_grad_(False)  # frozen: left out
    groups = param_groups(model, 0.05)
    by_name = {g["name"]: g for g in groups}
    assert by_name["decay"]["weight_decay"] == 0.05
    assert by_name["no_decay"]["weight_decay"] == 0.0
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    assert ids(by_name["decay"]["params"]) == ids([model[3].weight])
    assert ids(by_name["no_decay"]["params"]) == ids([model[0].bias, model[1].weight, model[1].bias, model[3].bias])


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_build_optimizer_kinds(name):
    model = tiny_model()
    optimizer = build_optimizer(model, name, lr=0.01, weight_decay=0.1, momentum=0.8, nesterov=True)
    expected = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[name]
    assert type(optimizer) is expected
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert all(g["lr"] == 0.01 for g in optimizer.param_groups)
    if name == "sgd":
        assert optimizer.defaults["momentum"] == 0.8 and optimizer.defaults["nesterov"] is True
    # the groups partition the trainable parameters
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_adamw_decays_only_the_decay_group():
    model = tiny_model()
    optimizer = build_optimizer(model, "adamw", lr=0.1, weight_decay=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # only the decoupled decay moves parameters
    optimizer.step()
    for n, p in model.named_parameters():
        if p.ndim > 1:
            torch.testing.assert_close(p.detach(), before[n] * (1 - 0.1 * 0.5))
        else:
            torch.testing.assert_close(p.detach(), before[n])


def test_build_optimizer_accepts_parameters_and_groups():
    model = tiny_model()
    assert len(build_optimizer(model.parameters()).param_groups) == 2
    groups = [{"params": list(model.parameters()), "weight_decay": 0.3}]
    assert build_optimizer(groups).param_groups[0]["weight_decay"] == 0.3


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"name": "lamb"}, "'lamb'"),
        ({"lr": 0}, "learning rate 0"),
        ({"lr": float("nan")}, "learning rate nan"),
        ({"weight_decay": -1}, "weight_decay -1"),
        ({"name": "sgd", "momentum": 0, "nesterov": True}, "nesterov"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"eps": 0}, "eps 0"),
    ],
)
def test_optimizer_validation_names_value_and_fix(kwargs, needle):
    with pytest.raises(UnetsegError, match="Fix:") as info:
        build_optimizer(tiny_model(), **kwargs)
    assert needle in str(info.value)


def test_no_trainable_parameters_is_an_error():
    model = tiny_model().requires_grad_(False)
    with pytest.raises(UnetsegError, match="no trainable parameters"):
        build_optimizer(model)


# --------------------------------------------------------------------------- 1 and 2 processes


def load_records(out: Path, nproc: int) -> list[dict]:
    files = sorted(out.glob("rank*.json"))
    assert [f.name for f in files] == [f"rank{r}.json" for r in range(nproc)]
    records = [json.loads(f.read_text()) for f in files]
    assert [r["rank"] for r in records] == list(range(nproc))
    assert all(r["num_processes"] == nproc for r in records)
    return records


def check_records(records: list[dict], nproc: int) -> None:
    schedule = LRSchedule(**records[0]["schedule"])
    base_lr = records[0]["base_lr"]
    steps = schedule.total_steps
    closed = [schedule.lr_at(k, base_lr) for k in range(3 * steps)]
    for record in records:
        cases = record["cases"]
        assert record["schedule"] == records[0]["schedule"]
        # The project's approach: one schedule step per optimiser step, with or without accumulation.
        for name, accumulation in (("ours", 1), ("ours_accum2", 2)):
            case = cases[name]
            assert case["accumulation"] == accumulation and case["prepared"] is False
            assert case["lrs"] == pytest.approx(closed[:steps], rel=1e-12)
            assert case["final_lr"] == pytest.approx(closed[steps])
            assert case["last_epoch"] == steps
        # accelerator.prepare(scheduler) with Accelerate's defaults: num_processes schedule
        # steps per optimiser step; accumulation micro-steps do not move the lr.
        for name in ("naive", "naive_accum2"):
            case = cases[name]
            assert case["prepared"] is True
            assert case["lrs"] == pytest.approx([closed[nproc * k] for k in range(steps)], rel=1e-12)
            assert case["last_epoch"] == nproc * steps
        # Micro-steps leave the scheduler alone: _step_count is 1 at construction, +1 per
        # LambdaLR.step(). (Accelerate would bump it there if GradientState.adjust_scheduler
        # were true, but GradientAccumulationPlugin.to_kwargs() drops its default True and
        # GradientState reads a missing key as False; a bump would not move the lr anyway.)
        assert cases["naive"]["step_count"] == 1 + nproc * steps
        assert cases["naive_accum2"]["step_count"] == 1 + nproc * steps
    # every rank saw exactly the same learning rates
    for record in records[1:]:
        assert record["cases"] == records[0]["cases"]


@pytest.mark.multiprocess
def test_schedule_one_process(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path / "out")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    records = load_records(tmp_path / "out", 1)
    check_records(records, 1)
    # With one process preparing the scheduler is harmless.
    assert records[0]["cases"]["naive"]["lrs"] == records[0]["cases"]["ours"]["lrs"]


@pytest.mark.multiprocess
def test_schedule_two_processes(tmp_path):
    # Without GPUs, `accelerate launch --multi_gpu` needs ACCELERATE_USE_CPU=1 for Accelerate
    # to see 2 processes (MULTI_CPU, gloo); the worker checks that it does.
    run_distributed(
        [str(WORKER), str(tmp_path / "out")], nproc=2, timeout=120, cwd=REPO,
        launcher="accelerate", env={"ACCELERATE_USE_CPU": "1"},
    )  # fmt: skip
    records = load_records(tmp_path / "out", 2)
    check_records(records, 2)
    # Preparing the scheduler really does run it twice as fast on 2 processes.
    assert records[0]["cases"]["naive"]["lrs"] != records[0]["cases"]["ours"]["lrs"]
