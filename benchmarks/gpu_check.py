"""The parts of the budgeted GPU check, one subcommand each; ``benchmarks/gpu_check.sh`` runs
them in this order on a lent GPU machine:

    python benchmarks/gpu_check.py augment --out OUT -- --config configs/camvid_gpu.yaml --data DATA
    python benchmarks/gpu_check.py smoke --out OUT --deadline T -- --config configs/camvid_gpu.yaml --data DATA
    python benchmarks/gpu_check.py throughput --out OUT --deadline T -- --data DATA --workers 4 ...
    python benchmarks/gpu_check.py recipe --out OUT --deadline T -- --config configs/camvid_gpu.yaml --data DATA

After ``--`` come ``unetseg train`` arguments (``benchmarks/gpu.py`` ones for ``throughput``).
``--deadline`` is the Unix time by which the whole check must be done: each part runs
under what is left of it, and a part cut short still records what it finished.

augment
    One batch (``--batches`` of them) of the training stream built as training builds it,
    augmented in the loader workers and augmented on ``--device``: same seed, same samples.
    Masks must be equal; images within ``(1 + j)^2 (1 + 2j)`` levels of 255 before
    normalisation for colour jitter ``j`` (see :func:`image_tolerance`).
smoke
    ``--steps`` steps of the recipe with ``TORCH_LOGS=recompiles,graph_breaks``, 4 loader
    workers and augmentation where training puts it, two validations: recompiles (and how
    many came after the first validation), graph breaks, finite losses, images/s, and the
    seconds spent on anything but training steps (start-up, compilation, evaluation).
throughput
    ``benchmarks/gpu.py`` with the arguments given (its JSON lines are kept in
    ``OUT/throughput.txt``): end-to-end images/s (gpu.py's own end-to-end runs if it made
    any, else the smoke's, which trains with the same recipe, workers and augmentation)
    against the compiled model's, and MFU.
recipe
    The recipe for as many steps as fit in what is left (whole ``--eval-every`` intervals,
    estimated from the smoke's images/s and overhead, at most ``--max-steps``), with the val
    mIoU of every evaluation.

Each part appends one JSON line (``"part"``: its name) to ``OUT/check.jsonl`` and prints a
line for people, then that JSON line; it exits non-zero when its check fails.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

# The 3b55f7d run of the GPU recipe (README, "CamVid on a GPU"): 8000 steps of batch 16,
# poly schedule over those 8000 steps, warmup 200, evaluated every 500 steps.
REFERENCE = {"commit": "3b55f7d", "steps": 8000, "mIoU": 0.7439}
TARGET_E2E_OVER_MODEL = 0.9  # issue 23: end to end at >= 0.9x the compiled model alone
RESERVE_S = 10.0  # kept back at the end of the budget to write the results
GRACE_S = 20.0  # between a part's SIGTERM at its limit and its SIGKILL (training checkpoints first)


# --- what the parts record ----------------------------------------------------------------


def record(out: Path, row: dict[str, Any], summary: str) -> None:
    """Append ``row`` to ``out/check.jsonl`` at once (a later part that times out cannot
    lose it), then print ``summary`` and the row."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "check.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    print(summary)
    print(json.dumps(row), flush=True)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of ``path`` (none when it does not exist)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def previous(out: Path, part: str) -> dict[str, Any] | None:
    """The last row an earlier part recorded, or None."""
    return next((r for r in reversed(read_rows(out / "check.jsonl")) if r.get("part") == part), None)


def limit(deadline: float | None, cap: float = math.inf) -> float:
    """A part's time limit: at most ``cap``, and ending early enough that its grace period
    after SIGTERM and the writing of its results still end within the budget."""
    left = math.inf if deadline is None else deadline - time.time() - RESERVE_S - GRACE_S
    return min(cap, left)


def run_logged(cmd: list[str], log: Path, timeout: float,
               env: dict[str, str] | None = None) -> tuple[int | None, float]:
    """Run ``cmd`` from the checkout with stdout and stderr written to ``log`` as they come;
    (exit status, or None when it ran out of ``timeout`` seconds; wall seconds). Past the
    limit it gets SIGTERM first (training then checkpoints and stops after its step), and
    SIGKILL ``GRACE_S`` later."""
    start = time.perf_counter()
    with log.open("w", encoding="utf-8") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        try:
            code: int | None = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            code = None
    return code, time.perf_counter() - start


def train_command(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "unetseg.train", *argv]


def recipe_warmup(train_argv: list[str], steps: int) -> int:
    """The recipe's warmup, cut to fit a run of ``steps`` steps (it must be shorter)."""
    from unetseg.flags import parse_args

    return min(parse_args(train_argv).optim.warmup_steps, steps - 1)


def batch_size(train_argv: list[str]) -> int:
    from unetseg.flags import parse_args

    return parse_args(train_argv).data.batch_size


# --- augment: the device path against the workers' ----------------------------------------


def image_tolerance(jitter: float) -> float:
    """Largest image difference allowed between the two paths, in levels of 255 before
    normalisation. torchvision resizes uint8 on a CPU with a fixed-point kernel and on
    CUDA in float32, so resized pixels may differ by one level (unetseg/augment.py); then
    brightness multiplies that by up to ``1 + j``, contrast by up to ``1 + j`` (its mean grey
    is an average, so nearly exact), saturation by up to ``1 + 2j`` (``s x + (1 - s) grey``,
    with ``s <= 1 + j`` and the grey's own error). On a CPU both paths agree to float error."""
    return (1 + jitter) ** 2 * (1 + 2 * jitter) + 1e-3


def compare_augmentation(train_argv: list[str], device: str, batches: int) -> dict[str, Any]:
    """The first ``batches`` training batches of the run ``train_argv`` describes, augmented
    in the workers and on ``device`` (through training's own stream and batch hook)."""
    import torch

    from unetseg.badsamples import StreamStats
    from unetseg.errors import UnetsegError
    from unetseg.flags import parse_args
    from unetseg.stream import batches_per_epoch
    from unetseg.train_data import TrainData, batch_hook, open_sources, train_batches, train_transform

    config = parse_args(train_argv)
    dc, accum = config.data, config.optim.grad_accum
    if not dc.data:
        raise UnetsegError("augment: no shards to read. Fix: pass --data (e.g. shards/camvid) after --")
    train, val = open_sources(config, dc.data)
    transform = train_transform(config, train)
    steps = batches_per_epoch(train.num_samples, dc.batch_size, 1, accum) // accum

    def first(where: str) -> tuple[TrainData, list[dict[str, Any]]]:
        data = TrainData(train, val, transform, None, steps, where)
        stream = train_batches(config, data, 0, 1, 0, StreamStats(dc.max_bad_samples))
        return data, list(itertools.islice(stream, batches))

    _, in_workers = first("workers")
    data, raw = first("device")
    hook = batch_hook(config, torch.device(device), data)
    std = torch.tensor(transform.config.std).view(1, 3, 1, 1)
    keys_equal, masks_equal, max_diff, max_levels, differ, pixels = True, True, 0.0, 0.0, 0, 0
    for want, got in zip(in_workers, raw):
        got = hook(got)
        image, mask = got["image"].float().cpu(), got["mask"].cpu()  # .cpu() waits for the device
        keys_equal &= want["keys"] == got["keys"]
        masks_equal &= torch.equal(want["mask"], mask)
        diff = (want["image"] - image).abs()
        levels = diff * std * 255
        max_diff, max_levels = max(max_diff, float(diff.max())), max(max_levels, float(levels.max()))
        differ += int((levels > 0.5).sum())
        pixels += levels.numel()
    tolerance = image_tolerance(dc.jitter)
    return {
        "device": device, "batches": len(raw), "batch_size": dc.batch_size, "crop_size": list(transform.crop or []),
        "jitter": dc.jitter, "keys_equal": keys_equal, "masks_equal": masks_equal,
        "max_abs_image_diff": max_diff, "max_image_diff_levels": round(max_levels, 4),
        "tolerance_levels": round(tolerance, 4), "fraction_off_by_a_level": differ / max(1, pixels),
        "ok": bool(keys_equal and masks_equal and max_levels <= tolerance and len(raw) == batches),
    }


def cmd_augment(args: argparse.Namespace) -> int:
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    row = {"part": "augment", **compare_augmentation(args.rest, device, args.batches)}
    record(args.out, row, f"augmentation on {device} against the workers, {row['batches']} batches: masks "
           f"{'equal' if row['masks_equal'] else 'DIFFERENT'}, images within {row['max_image_diff_levels']} levels "
           f"(tolerance {row['tolerance_levels']}): {'ok' if row['ok'] else 'FAILED'}")
    return 0 if row["ok"] else 1


# --- smoke: recompiles, graph breaks, finite losses, images/s -----------------------------

RECOMPILE = re.compile(r"\[__recompiles\] Recompiling function (\S+) in (\S+)")
REASON = re.compile(r"\[__recompiles\]\s+- (?:\d+/\d+: )?(.*\S)")  # the first guard that failed
GRAPH_BREAK = re.compile(r"\[__graph_breaks\] Graph break\b.*?\bin user code at (\S+)")
LIMIT = re.compile(r"hit config\.(?:recompile_limit|cache_size_limit)")
VALIDATION = re.compile(r"\bstep (\d+): val mIoU")
NONFINITE = re.compile(r"non-finite loss in (\d+) of the")


def parse_compile_log(text: str) -> dict[str, Any]:
    """What ``TORCH_LOGS=recompiles,graph_breaks`` wrote into a training log: each
    recompile (function, the guard that failed, whether it came after the log's first
    validation line), each graph break's place, and whether a recompile limit was hit.

    The first validation may recompile once (a new grad mode); a recompile after it means
    training or validation keeps compiling."""
    recompiles: list[dict[str, Any]] = []
    breaks: list[str] = []
    validated = False
    for line in text.splitlines():
        if VALIDATION.search(line):
            validated = True
        elif m := RECOMPILE.search(line):
            recompiles.append({"function": m[1], "at": m[2], "reason": None, "after_first_validation": validated})
        elif (m := REASON.search(line)) and recompiles and recompiles[-1]["reason"] is None:
            recompiles[-1]["reason"] = m[1]
        elif m := GRAPH_BREAK.search(line):
            breaks.append(m[1])
    return {
        "recompiles": len(recompiles),
        "recompiles_after_first_validation": sum(r["after_first_validation"] for r in recompiles),
        "recompile_reasons": [r["reason"] for r in recompiles],
        "graph_breaks": len(breaks), "graph_break_sites": sorted(set(breaks)),
        "recompile_limit_hit": bool(LIMIT.search(text)),
    }


def training_summary(log: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Losses, images/s and evaluations of a run's ``metrics.jsonl`` rows and log. The
    logged loss is the mean of a window's finite losses, so a non-finite one shows only as
    the loop's warning: both are checked."""
    losses = [r["loss"] for r in rows if "loss" in r]
    rates = [r["images_per_s"] for r in rows if "images_per_s" in r]
    evals = [{"step": r["step"], "mIoU": r["mIoU"]} for r in rows if "mIoU" in r]
    skipped = sum(int(n) for n in NONFINITE.findall(log))
    return {
        "steps_done": max((r["step"] for r in rows), default=0), "losses_logged": len(losses),
        "losses_finite": bool(losses) and all(math.isfinite(v) for v in losses) and not skipped,
        "nonfinite_steps_skipped": skipped, "last_loss": losses[-1] if losses else None,
        # The first window holds start-up and the first compilation.
        "images_per_s": statistics.median(rates[1:] or rates) if rates else None,
        "evals": evals,
    }


def banner(log: str) -> str | None:
    """The run's one-line description (model, device, precision, compiled, augmentation)."""
    return next((line for line in log.splitlines() if " parameters; " in line), None)


def too_late(args: argparse.Namespace, least: float = 30) -> bool:
    """Record that this part is skipped when less than ``least`` seconds are left."""
    left = limit(args.deadline)
    if left < least:
        record(args.out, {"part": args.part, "skipped": f"{left:.0f} s left of the budget"},
               f"{args.part}: skipped, {left:.0f} s left of the budget")
    return left < least


def cmd_smoke(args: argparse.Namespace) -> int:
    if too_late(args):
        return 1
    steps = args.steps
    argv = ["--tracker", "none", "--num-workers", str(args.workers), "--log-every", str(max(1, steps // 12)),
            "--warmup-steps", str(recipe_warmup(args.rest, steps)), *args.rest,
            "--max-steps", str(steps), "--eval-every", str(max(1, steps // 2))]  # two validations
    batch = batch_size(argv)  # also checks every argument before any device time is spent
    env = {**os.environ, "TORCH_LOGS": "recompiles,graph_breaks"}
    with tempfile.TemporaryDirectory() as tmp:  # checkpoints stay out of OUT
        run = Path(tmp) / "run"
        code, wall = run_logged(train_command([*argv, "--output-dir", str(run)]), args.out / "smoke.log",
                                limit(args.deadline, args.timeout), env)
        if (run / "metrics.jsonl").is_file():
            shutil.copy(run / "metrics.jsonl", args.out / "smoke-metrics.jsonl")
        rows = read_rows(run / "metrics.jsonl")
    log = (args.out / "smoke.log").read_text(encoding="utf-8", errors="replace")
    train, compiled = training_summary(log, rows), parse_compile_log(log)
    rate = train["images_per_s"]
    # Everything but the training steps: start-up, compilation, evaluations, checkpoints.
    overhead = wall - train["steps_done"] * batch / rate if rate else None
    ok = (code == 0 and train["steps_done"] == steps and train["losses_finite"] and compiled["graph_breaks"] == 0
          and compiled["recompiles_after_first_validation"] == 0 and not compiled["recompile_limit_hit"])
    row = {"part": "smoke", "exit": code, "timed_out": code is None, "wall_s": round(wall, 1), "steps": steps,
           "batch_size": batch, "overhead_s": round(overhead, 1) if overhead is not None else None,
           **train, **compiled, "banner": banner(log), "ok": ok}
    record(args.out, row, f"smoke: {train['steps_done']}/{steps} steps in {wall:.0f} s, "
           f"{rate or 0:.1f} images/s, losses {'finite' if train['losses_finite'] else 'NOT FINITE'}, "
           f"{compiled['recompiles']} recompiles ({compiled['recompiles_after_first_validation']} after the first "
           f"validation), {compiled['graph_breaks']} graph breaks: {'ok' if ok else 'FAILED'} (log: smoke.log)")
    return 0 if ok else 1


# --- throughput: end to end against the compiled model --------------------------------------


def throughput(gpu: dict[str, Any], smoke: dict[str, Any] | None) -> dict[str, Any]:
    """The throughput answer from gpu.py's last JSON line (and the smoke's images/s when
    gpu.py ran no end-to-end training)."""
    model = gpu.get("compiled_model_images_per_s") or gpu.get("model_images_per_s")
    e2e, source = gpu.get("e2e_images_per_s"), "gpu.py"
    if e2e is None and smoke and smoke.get("images_per_s"):
        e2e, source = smoke["images_per_s"], "smoke"
    # MFU is proportional to the rate: gpu.py gives it for the model rate.
    mfu = gpu["model_mfu"] * e2e / gpu["model_images_per_s"] if gpu.get("model_mfu") and e2e else None
    ratio = e2e / model if e2e and model else None
    return {
        "device": gpu.get("device"), "size": gpu.get("size"),
        "model_compiled": bool(gpu.get("compiled_model_images_per_s")), "model_images_per_s": model,
        "e2e_images_per_s": e2e, "e2e_source": source if e2e else None,
        "e2e_over_model": round(ratio, 3) if ratio else None, "target_e2e_over_model": TARGET_E2E_OVER_MODEL,
        "meets_target": ratio >= TARGET_E2E_OVER_MODEL if ratio else None,
        "mfu": mfu, "model_mfu": gpu.get("model_mfu"), "flops_per_image": gpu.get("flops_per_image"),
        "loader_images_per_s": gpu.get("loader_images_per_s"),
        "loader_workers": gpu.get("loader_workers"), "loader_augment_on": gpu.get("loader_augment_on"),
        "bound": gpu.get("bound"), "eager_images_per_s": gpu.get("images_per_s"),
    }


def cmd_throughput(args: argparse.Namespace) -> int:
    if too_late(args):
        return 1
    log = args.out / "throughput.txt"
    code, wall = run_logged([sys.executable, "benchmarks/gpu.py", *args.rest], log,
                            limit(args.deadline, args.timeout))
    parts = [json.loads(line) for line in log.read_text(encoding="utf-8", errors="replace").splitlines()
             if line.startswith("{")]
    row = {"part": "throughput", "exit": code, "timed_out": code is None, "wall_s": round(wall, 1),
           "gpu_py_parts": [p.get("part") for p in parts],
           **throughput(parts[-1] if parts else {}, previous(args.out, "smoke"))}
    ok = code == 0 and row["e2e_images_per_s"] is not None and row["model_images_per_s"] is not None
    mfu = f", MFU {100 * row['mfu']:.1f}%" if row["mfu"] is not None else ""
    record(args.out, row, f"throughput: end to end {row['e2e_images_per_s']} images/s ({row['e2e_source']}) against "
           f"{row['model_images_per_s']} for the {'compiled ' if row['model_compiled'] else ''}model alone = "
           f"{row['e2e_over_model']}x (target {TARGET_E2E_OVER_MODEL}){mfu}; loader bound: {row['bound']} "
           f"(log: throughput.txt)")
    return 0 if ok else 1


# --- recipe: as many steps as fit -----------------------------------------------------------


def plan_steps(rate: float, batch: int, overhead: float, left: float, max_steps: int, eval_every: int,
               eval_seconds: float, margin: float = 0.9) -> int:
    """Steps of training that fit in ``left`` seconds: whole ``eval_every`` intervals, each
    costing its steps at ``rate`` images/s plus one evaluation and checkpoint, after
    ``overhead`` seconds of start-up and compilation, within ``margin`` of the time (the
    rate and overhead come from a 300-step run), at most ``max_steps``; 0 if none fits."""
    usable = margin * (left - overhead)
    interval = eval_every * batch / rate + eval_seconds
    return min(max_steps, int(usable // interval) * eval_every) if usable > 0 else 0


def cmd_recipe(args: argparse.Namespace) -> int:
    smoke, measured = previous(args.out, "smoke") or {}, previous(args.out, "throughput") or {}
    rate = smoke.get("images_per_s") or measured.get("e2e_images_per_s")
    overhead = smoke.get("overhead_s") if smoke.get("overhead_s") is not None else args.overhead
    batch, left = batch_size(args.rest), limit(args.deadline)
    steps = plan_steps(rate, batch, overhead, left, args.max_steps, args.eval_every, args.eval_seconds) if rate else 0
    plan = {"part": "recipe", "rate_used": rate, "overhead_used_s": overhead, "left_s": round(left, 1),
            "steps_planned": steps, "eval_every": args.eval_every, "reference": REFERENCE}
    if not steps:
        why = "no images/s measured by the smoke or gpu.py" if not rate else \
            f"{left:.0f} s left is less than start-up ({overhead:.0f} s) and one interval of {args.eval_every} steps"
        record(args.out, {**plan, "skipped": why}, f"recipe: skipped, {why}")
        return 0
    warmup = recipe_warmup(args.rest, steps)
    argv = ["--tracker", "none", "--warmup-steps", str(warmup), *args.rest,
            "--max-steps", str(steps), "--eval-every", str(args.eval_every)]
    run = Path(args.run) if args.run else Path(tempfile.mkdtemp()) / "run"
    try:
        code, wall = run_logged(train_command([*argv, "--output-dir", str(run)]), args.out / "recipe.log", left)
        if (run / "metrics.jsonl").is_file():
            shutil.copy(run / "metrics.jsonl", args.out / "recipe-metrics.jsonl")
        rows = read_rows(run / "metrics.jsonl")
    finally:
        if not args.run:
            shutil.rmtree(run.parent, ignore_errors=True)  # checkpoints of a throwaway run
    log = (args.out / "recipe.log").read_text(encoding="utf-8", errors="replace")
    train = training_summary(log, rows)
    finished = code == 0 and train["steps_done"] == steps
    evals = train["evals"]
    row = {**plan, "warmup_steps": warmup, "exit": code, "timed_out": code is None, "wall_s": round(wall, 1), **train,
           "finished": finished, "final_mIoU": evals[-1]["mIoU"] if evals else None,
           "best_mIoU": max((e["mIoU"] for e in evals), default=None),
           # Like for like only on the reference's own schedule: poly over 8000 steps.
           "like_for_like": finished and steps == REFERENCE["steps"]}
    shown = ", ".join(f"{100 * e['mIoU']:.2f} at {e['step']}" for e in evals) or "none"
    record(args.out, row, f"recipe: {train['steps_done']}/{steps} steps (poly over {steps}, warmup {warmup}) in "
           f"{wall:.0f} s; val mIoU {shown} (3b55f7d: {100 * REFERENCE['mIoU']:.2f} at {REFERENCE['steps']}, "
           f"{'same schedule' if row['like_for_like'] else 'another schedule'}) (log: recipe.log)")
    return 0 if finished or (code is None and evals) else 1


# --- the command line -----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", type=Path, required=True, help="where check.jsonl and the logs go")
    common.add_argument("--deadline", type=float, help="Unix time by which the whole check must be done")
    p = sub.add_parser("augment", parents=[common], help="the device augmentation against the workers'")
    p.add_argument("--device", default="auto", help="where to augment (auto: cuda when there is one, else cpu)")
    p.add_argument("--batches", type=int, default=4)
    p = sub.add_parser("smoke", parents=[common], help="a short run under TORCH_LOGS=recompiles,graph_breaks")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--workers", type=int, default=4, help="loader workers (the issue's target setting)")
    p.add_argument("--timeout", type=float, default=240)
    p = sub.add_parser("throughput", parents=[common], help="benchmarks/gpu.py, end to end against the model")
    p.add_argument("--timeout", type=float, default=200)
    p = sub.add_parser("recipe", parents=[common], help="the recipe for as many steps as fit")
    p.add_argument("--max-steps", type=int, default=REFERENCE["steps"], help="at most this many (default: the "
                   "3b55f7d run's 8000, the schedule its 74.39 was reached with)")
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--eval-seconds", type=float, default=5.0, help="time allowed per evaluation and checkpoint")
    p.add_argument("--overhead", type=float, default=90.0, help="start-up and compile seconds when the smoke "
                   "measured none")
    p.add_argument("--run", help="the run folder to keep (default: a temporary one, deleted)")
    args = parser.parse_args(own)
    args.rest = rest
    args.out.mkdir(parents=True, exist_ok=True)
    parts = {"augment": cmd_augment, "smoke": cmd_smoke, "throughput": cmd_throughput, "recipe": cmd_recipe}
    return parts[args.part](args)


if __name__ == "__main__":
    sys.exit(main())
