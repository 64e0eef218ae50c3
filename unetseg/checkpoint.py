"""Checkpoints (full training state, for resume) and saved models (weights for evaluate/predict).

A checkpoint is ``RUN/checkpoints/step-00001234/``: Accelerate's ``save_state`` files
(model, optimiser, scheduler, AMP scaler, every rank's RNG states) plus
``trainer_state.json`` (step, epoch, data position, best mIoU, tracker run id). It is
written under ``step-...tmp`` and renamed when complete, so a folder with the final name
is always whole; an interrupted write is never loaded and is swept away by the next save.
Every file and folder is fsynced before the rename and the parent folder after it, so a
checkpoint also survives a node crash or power loss whole, or not at all.
Only the newest ``keep`` checkpoints stay, older ones are deleted after a newer one is
complete. Checkpoints assume a file system shared by all ranks.

A saved model (``best/``, ``final/``) holds ``model.safetensors``, ``config.yaml`` (the
training config, whose ``model`` section names the registered model and holds its exact
options, ``num_classes`` included) and ``dataset.json``: everything evaluate, predict and
export need to rebuild it, no training state, nothing unpickled on load. Models saved
before the registry recorded a U-Net under ``unet``; they still load.

A training checkpoint loads as a model too (evaluate, predict and export accept
``RUN/checkpoints/step-N``): its weights are the trained module's (deep supervision's heads
and a DDP prefix are dropped), its model options those its ``trainer_state.json`` records,
and its config and dataset.json come from the run dir, the config being the one the
session that reached that step was started (or resumed) with.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from unetseg.dataset import DATASET_JSON, DatasetInfo
from unetseg.errors import UnetsegError

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
_NAME = re.compile(r"^step-(\d{8})$")
_RESUMED = re.compile(r"^config\.resumed-step-(\d+)\.yaml$")


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (a ``.tmp`` folder is never one)."""
    folder = Path(run_dir) / CHECKPOINTS
    found = []
    if folder.is_dir():
        for path in folder.iterdir():
            match = _NAME.match(path.name)
            if match and (path / STATE_FILE).is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def resolve_resume(run_dir: str | os.PathLike, resume: str | None) -> Path | None:
    """``None``: start fresh; ``"auto"``: the latest complete checkpoint (or fresh when none);
    a path: that checkpoint, which must be complete."""
    if resume is None:
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if not _NAME.match(path.name) or not (path / STATE_FILE).is_file():
        raise UnetsegError(
            f"--resume {resume}: not a complete checkpoint (expected a checkpoints/step-NNNNNNNN folder with "
            f"{STATE_FILE}). Fix: pass --resume auto, or one of the folders under {Path(run_dir) / CHECKPOINTS}"
        )
    return path


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's contents to the storage device (a folder: its entries)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder``, then every folder bottom-up: after this a
    rename of ``folder`` cannot be found on disk, after a power loss, pointing at
    files that never made it there."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(root)


def replace_durably(tmp: Path, final: Path) -> None:
    """Rename the complete ``tmp`` (file or folder, already fsynced) to ``final``, and
    fsync the parent folder so that the rename itself survives a crash."""
    os.replace(tmp, final)
    fsync_path(final.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``path`` whole or not at all, also across a node crash: a temporary file,
    fsynced, renamed into place, then the folder fsynced."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """:func:`write_text_atomic` for bytes."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    replace_durably(tmp, path)


def save_checkpoint(accelerator, run_dir: str | os.PathLike, step: int, state: dict[str, Any], keep: int) -> Path:
    """Save the full training state at ``step`` (a collective: every rank calls it).

    When any rank cannot write its part (disk full, read-only or vanished output folder),
    every rank learns it, the partial folder is removed, the previous checkpoints stay
    as they are, and every rank raises :class:`UnetsegError` naming the folder and the
    cause: no rank is left waiting for the others."""
    final = checkpoint_path(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    main = accelerator.is_main_process
    problems = _agree(lambda: _start(tmp) if main else None)
    if not problems:
        problems = _agree(lambda: accelerator.save_state(str(tmp)))
    if not problems:
        problems = _agree(lambda: _complete(tmp, final, state, run_dir, keep) if main else None)
    if problems:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        raise UnetsegError(
            f"cannot write checkpoint {final}: {problems[0]}. The run stopped; "
            + (f"the previous checkpoint {previous} is intact. " if previous else "no checkpoint was written before. ")
            + f"Fix: free space in (or make writable) {Path(run_dir)}, then continue with --resume auto --output-dir {run_dir}"
        )
    return final


def _start(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)


def _complete(tmp: Path, final: Path, state: dict[str, Any], run_dir, keep: int) -> None:
    # The state file last: a folder with the final name and this file is complete.
    write_text_atomic(tmp / STATE_FILE, json.dumps(state, indent=2))
    fsync_tree(tmp)  # every rank's files are on the shared file system by now
    if final.exists():  # the same step saved again (a stop right after a periodic save)
        shutil.rmtree(final)
    replace_durably(tmp, final)
    prune_checkpoints(run_dir, keep)


def _agree(action) -> list[str]:
    """Run ``action`` on this rank, then tell every rank what failed anywhere (a barrier
    too): the message of each rank whose ``action`` raised ``OSError``."""
    from unetseg.distributed import all_gather_objects

    try:
        action()
        mine = None
    except OSError as e:
        mine = f"{e.strerror or e}" + (f" ({e.filename})" if e.filename else "")
    return [p for p in all_gather_objects(mine) if p]


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and leftovers of interrupted writes."""
    complete = list_checkpoints(run_dir)
    for _, path in complete[: max(0, len(complete) - keep)]:
        shutil.rmtree(path, ignore_errors=True)
    for path in (Path(run_dir) / CHECKPOINTS).glob("step-*.tmp"):
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(accelerator, path: str | os.PathLike) -> dict[str, Any]:
    """Restore the training state saved at ``path``; returns its ``trainer_state.json``."""
    path = Path(path)
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    accelerator.load_state(str(path))  # Accelerate loads with torch.load(weights_only=True)
    return state


# --- saved models ---------------------------------------------------------------------


def save_model(folder: str | os.PathLike, model: torch.nn.Module, config: dict[str, Any], dataset: DatasetInfo) -> Path:
    """Write ``model.safetensors``, ``config.yaml`` and ``dataset.json`` to ``folder``,
    replacing it whole (written aside, then renamed)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(weights, tmp / WEIGHTS_FILE)
    (tmp / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    (tmp / DATASET_JSON).write_text(dataset.to_json(), encoding="utf-8")
    fsync_tree(tmp)
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
        replace_durably(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        replace_durably(tmp, folder)
    return folder


def model_folder(path: str | os.PathLike) -> Path:
    """The folder to load a model from: ``path`` itself (a saved model, or a training
    checkpoint ``RUN/checkpoints/step-N``), or ``path/best`` (then ``path/final``) for a run dir."""
    path = Path(path)
    if is_checkpoint(path) and not (path / WEIGHTS_FILE).is_file():
        raise UnetsegError(
            f"{path}: a training checkpoint without {WEIGHTS_FILE} (its model was saved in another format). "
            f"Fix: use the run's best/ or final/ folder ({path.parent.parent / 'best'})"
        )
    for candidate in (path, path / "best", path / "final"):
        if (candidate / WEIGHTS_FILE).is_file():
            return candidate
    also = " or one of its checkpoints/step-NNNNNNNN folders" if list_checkpoints(path) else ""
    raise UnetsegError(
        f"{path}: no {WEIGHTS_FILE} here or in best/ or final/. Fix: pass a run dir written by "
        f"`unetseg train`, or its best/ or final/ folder{also}"
    )


def is_checkpoint(folder: Path) -> bool:
    """A training checkpoint (``RUN/checkpoints/step-N``), not a saved model."""
    return (folder / STATE_FILE).is_file()


def owning_run(folder: Path) -> Path:
    """The run dir a model folder belongs to: two up from a checkpoint, one up from
    ``best/`` or ``final/``."""
    return folder.parent.parent if is_checkpoint(folder) else folder.parent


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any], DatasetInfo]:
    """The model at ``path`` (see :func:`model_folder`), rebuilt from the registry by the
    name and options it was trained with, its config (whose ``model`` section holds those
    options, as a saved model's does) and dataset description. A training checkpoint's
    config and dataset.json are its run dir's (:func:`checkpoint_parts`)."""
    from safetensors.torch import load_file

    from unetseg.models import build_model, saved_model_options

    folder = model_folder(path)
    if is_checkpoint(folder):
        config, info, options, weights = checkpoint_parts(folder, map_location)
    else:
        config = _saved_config(folder)
        info, options = DatasetInfo.load(folder), saved_model_options(config)
        weights = load_file(folder / WEIGHTS_FILE, device=str(map_location))
    model = build_model(options.for_saved_weights())  # its own weights come next: nothing to fetch
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise UnetsegError(
            f"{folder / WEIGHTS_FILE}: the weights do not fit the model its config records "
            f"({str(e).splitlines()[0]}). Fix: use a best/ or final/ folder written by `unetseg train`"
        ) from None
    return model, config, info


def normalization(config: dict[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) a saved model's input is normalised with, from its config."""
    from unetseg.models import saved_model_options

    return saved_model_options(config).normalization()


def _saved_config(folder: Path) -> dict[str, Any]:
    """A saved model's ``config.yaml``; a folder with weights and none is no saved model
    (an interrupted checkpoint's ``step-N.tmp``, say)."""
    if not (folder / CONFIG_FILE).is_file():
        raise UnetsegError(
            f"{folder}: {WEIGHTS_FILE} without a {CONFIG_FILE}: neither a saved model nor a complete training "
            f"checkpoint. Fix: pass a run dir, its best/ or final/ folder, or a complete {CHECKPOINTS}/step-NNNNNNNN folder"
        )
    return yaml.safe_load((folder / CONFIG_FILE).read_text(encoding="utf-8"))


def checkpoint_parts(folder: Path, map_location) -> tuple[dict[str, Any], DatasetInfo, Any, dict[str, torch.Tensor]]:
    """What :func:`load_model` needs from a training checkpoint: the config it was trained
    with (its ``model`` section: the options the checkpoint records), the run dir's
    dataset.json, the model options, and the plain model's weights."""
    from safetensors.torch import load_file

    from unetseg.models import saved_model_options

    run_dir = owning_run(folder)
    if not ((run_dir / CONFIG_FILE).is_file() and (run_dir / DATASET_JSON).is_file()):
        raise UnetsegError(
            f"{folder}: a training checkpoint, whose {CONFIG_FILE} and {DATASET_JSON} are its run dir's, but "
            f"{run_dir} has no {CONFIG_FILE} or {DATASET_JSON} (was the checkpoint moved out of RUN/{CHECKPOINTS}/?). "
            "Fix: put it back under its run dir's checkpoints/, or use the run's best/ or final/ folder"
        )
    state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    setup = state.get("setup") or {}
    config = yaml.safe_load(trained_with(run_dir, int(state.get("step", 0))).read_text(encoding="utf-8"))
    info = DatasetInfo.load(run_dir)
    if isinstance(setup.get("model"), dict):  # the options as built, num_classes included
        options = saved_model_options({"model": setup["model"]})
    else:  # checkpoints of older versions record no setup: the config's, with the data's classes
        options = saved_model_options(config).model_copy(update={"num_classes": info.num_classes})
    weights = net_weights(load_file(folder / WEIGHTS_FILE, device=str(map_location)))
    return {**config, "model": options.to_dict()}, info, options, weights


def trained_with(run_dir: Path, step: int) -> Path:
    """The config of the session that trained up to ``step``: the last start before it
    (``sessions.jsonl``) wrote ``config.resumed-step-S.yaml`` when it was resumed with
    other options, else it ran with ``config.yaml``."""
    from unetseg.runstate import read_jsonl

    resumed = {int(m.group(1)): p for p in run_dir.glob("config.resumed-step-*.yaml")
               if (m := _RESUMED.match(p.name))}
    starts = [r["step"] for r in read_jsonl(run_dir / "sessions.jsonl")
              if r.get("event") == "start" and isinstance(r.get("step"), int)] or list(resumed)
    before = [s for s in starts if s < step]
    return resumed.get(max(before), run_dir / CONFIG_FILE) if before else run_dir / CONFIG_FILE


def net_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The plain model's weights from what Accelerate saved of the trained module: without
    DDP's ``module.`` prefix, and without deep supervision's wrapper (``net.``) and heads."""
    if weights and all(k.startswith("module.") for k in weights):
        weights = {k[len("module."):]: v for k, v in weights.items()}
    if any(k.startswith("heads.") for k in weights) and any(k.startswith("net.") for k in weights):
        weights = {k[len("net."):]: v for k, v in weights.items() if k.startswith("net.")}
    return weights
