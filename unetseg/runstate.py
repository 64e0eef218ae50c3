"""What a run leaves on disk and how a resumed run finds its place: the run dir and the
checkpoint to start from, the state saved with every checkpoint, the setup a resume must
match, the run's config files, and ``metrics.jsonl``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from unetseg.checkpoint import STATE_FILE
from unetseg.config import TrainConfig
from unetseg.errors import UnetsegError
from unetseg.runtime import on_main


@dataclass
class TrainerState:
    step: int = 0
    """Optimiser steps taken; the stream has handed out ``step * grad_accum`` micro-batches."""
    best_miou: float | None = None
    best_step: int | None = None
    nonfinite_streak: int = 0
    tracker_run_id: str | None = None
    pending_eval: bool = False
    """The evaluation due at ``step`` did not complete (a stop cut it short): resume runs it first."""
    setup: dict[str, Any] = field(default_factory=dict)
    """What the data position depends on (see :func:`run_setup`); resume refuses another."""

    @classmethod
    def load(cls, checkpoint: Path) -> TrainerState:
        data = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


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


def run_setup(config: TrainConfig, world: int, train_source, model_options: dict[str, Any]) -> dict[str, Any]:
    """What the data position of a step and the checkpoint's contents depend on, as JSON
    types: resuming with any of it changed would silently continue on other data, or load
    weights and optimiser moments into what they were not made for (or fail to load). The
    rest of the config may change on a resume (:func:`unetseg.train.load_resumed`)."""
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
        "model": model_options,
        "deep_supervision": config.loss.deep_supervision > 0,  # its heads are in the checkpoint or not
        "optimizer": config.optim.optimizer,  # its saved moments are of this optimiser's kind
    }))


# How to give each setting its original value back.
SETUP_FIX = {
    "world_size": "launch the same number of processes (accelerate launch --num_processes N)",
    "num_workers": "--num-workers", "batch_size": "--batch-size", "grad_accum": "--grad-accum", "seed": "--seed",
    "shuffle_buffer": "--shuffle-buffer", "train_split": "--train-split",
    "train_shards": "--data with the same training shards", "model": "the same --model-* options",
    "deep_supervision": "--deep-supervision on (> 0) or off (0) as when the run started",
    "optimizer": "the same --optimizer (its moments do not carry over to another one)",
}


def check_setup(saved: dict[str, Any], current: dict[str, Any], checkpoint: Path) -> None:
    """Refuse to resume ``checkpoint`` with another setup (checkpoints of older versions
    record none and are not checked)."""
    from unetseg.models import saved_model_options

    saved, current = dict(saved), dict(current)
    for setup in (saved, current):  # as a saved model's options are read (older ones lack newer fields, or a name)
        if isinstance(setup.get("model"), dict):
            setup["model"] = saved_model_options({"model": setup["model"]}).to_dict()
    changed = [key for key in current if key in saved and saved[key] != current[key]]
    if not changed:
        return

    def short(value: Any) -> str:
        text = json.dumps(value)
        return text if len(text) <= 80 else text[:77] + "..."

    lines = [f"  - {key}: {short(saved[key])} when the run started, {short(current[key])} now "
             f"(fix: {SETUP_FIX[key]})" for key in changed]
    raise UnetsegError(
        f"cannot resume from {checkpoint}: what the data order or the checkpoint's contents depend on has changed:\n" + "\n".join(lines) +
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


def session_record(accelerator, step: int, resumed_from: Path | None) -> dict[str, Any]:
    """What ``sessions.jsonl`` keeps of one start of a run (a resume is another start): the
    command, when, where and on what, for ``unetseg report``."""
    import os
    import platform
    import shlex
    import sys

    import torch

    from unetseg import __version__

    argv = list(sys.argv)
    if argv and argv[0].endswith(("unetseg/train.py", "unetseg\\train.py")):
        argv[:1] = ["python", "-m", "unetseg.train"]
    elif argv:
        argv[0] = Path(argv[0]).name
    device = accelerator.device
    if device.type == "cuda":
        hardware = f"{torch.cuda.get_device_name(device)} x {accelerator.num_processes} process(es)"
    else:
        cpu = platform.processor() or platform.machine()
        try:
            names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")]
            cpu = names[0] if names else cpu
        except OSError:
            pass
        hardware = f"{cpu}, {os.cpu_count()} cores, {accelerator.num_processes} process(es)"
    return {"event": "start", "time": now(),
            "command": shlex.join(argv), "step": step, "resumed_from": str(resumed_from) if resumed_from else None,
            "host": platform.node(), "hardware": hardware, "device": device.type,
            "num_processes": accelerator.num_processes, "mixed_precision": str(accelerator.mixed_precision),
            "unetseg": __version__, "torch": torch.__version__, "python": platform.python_version()}


def record_session_end(run_dir: Path, step: int, stopped: bool) -> None:
    append_jsonl(run_dir / "sessions.jsonl", {"event": "end", "time": now(), "step": step, "stopped": stopped})


def now() -> str:
    """Local time with its UTC offset, to the second, as the run's records write it."""
    return datetime.now().astimezone().isoformat(timespec="seconds")


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of one of the run's ``.jsonl`` files (see :func:`jsonl_records`)."""
    return jsonl_records(path)[0]


def jsonl_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The JSON-object lines of ``path`` (none when it is missing) and how many other
    lines were left out: a run killed mid-write leaves its last line cut short, and a
    resume or the report must read past it, not stop on it."""
    if not path.is_file():
        return [], 0
    records, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
    return records, bad


def truncate_metrics(path: Path, step: int, pending_eval: bool = False) -> None:
    """Drop lines logged after ``step`` (by a run that died after its last checkpoint), and
    the evaluation at ``step`` when it is to be run again."""
    from unetseg.checkpoint import write_text_atomic

    if not path.is_file():
        return
    kept = [r for r in read_jsonl(path) if r["step"] < step or (r["step"] == step and not (pending_eval and "mIoU" in r))]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
