"""``unetseg export``: a saved model as ONNX or TorchScript, checked against the eager model.

>>> report = export("runs/demo", "onnx", Path("model.onnx"))
>>> report.checks   # [(input shape, max |exported - eager|), ...]

The exported graph is the network alone: input ``image``, float32 ``N x 3 x H x W``, RGB
scaled to [0, 1] and normalised with the ImageNet mean and std (``(x - mean) / std``);
output ``logits``, float32 ``N x num_classes x H x W`` (argmax over dim 1 gives the class
ids). Batch, height and width are **dynamic**: the model pads to a multiple of
``2**depth`` inside and crops back, and both formats keep that arithmetic in the graph.
Resizing (a model trained with ``eval_resize``), the argmax and the palette are left to
the caller; the class names, palette, ignore index, mean, std, ``eval_resize`` and the
model's registered name and options (``model``) travel with the file as JSON (ONNX: the model metadata property
``unetseg``; TorchScript: the extra file ``unetseg.json`` of ``torch.jit.load``).

- **onnx**: ``torch.onnx.export(dynamo=True)``, the torch.export-based exporter, the
  default and recommended one since PyTorch 2.9 (the TorchScript-based one is
  deprecated). It needs ``onnxscript`` (which brings ``onnx``) and this module checks
  the file with ``onnxruntime``: ``pip install onnx onnxscript onnxruntime``. Its
  operators start at opset 18, so 18 is the lowest opset accepted (and the default).
  Weights are stored inside the one ``.onnx`` file.
- **torchscript**: ``torch.jit.trace`` of the eval-mode model (``torch.jit.load`` it
  without unetseg installed). TorchScript is deprecated in recent PyTorch releases but
  still works; its deprecation warnings are silenced here.

Right after writing, the file is loaded back (ONNX Runtime on the CPU, or
``torch.jit.load``) and run on two seeded random inputs: one of the example size (by
default ``eval_resize`` if the model was trained with it, else the most common image
size in its dataset.json) and a batch of two of another size, so the dynamic axes are
exercised. The largest absolute difference to the eager model must be at most
``1e-4 * max(1, max |eager logits|)`` (fp32), else :class:`UnetsegError`. The file is
written under a hidden temporary name and renamed only after the check passes, so
``out`` is never a half-written or unchecked model.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from unetseg.errors import UnetsegError

FORMATS = ("onnx", "torchscript")
MIN_OPSET = 18
DEFAULT_OPSET = 18
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
RTOL = 1e-4
"""The check's tolerance relative to the largest eager logit (at least 1), fp32."""
METADATA_KEY = "unetseg"
TORCHSCRIPT_EXTRA_FILE = "unetseg.json"
_FALLBACK_SIZE = (64, 64)


@dataclass
class ExportReport:
    """What :func:`export` wrote and how well it matched the eager model."""

    path: Path
    format: str
    opset: int | None
    """The ONNX opset of the file; None for TorchScript."""
    example_size: tuple[int, int]
    """(H, W) of the input traced or exported with."""
    checks: list[tuple[tuple[int, ...], float, float]] = field(default_factory=list)
    """(input shape, max |exported - eager|, tolerance) per checked input."""
    dynamic_axes: tuple[str, ...] = ("batch", "height", "width")
    seconds: float = 0.0

    @property
    def max_abs_diff(self) -> float:
        return max(diff for _, diff, _ in self.checks)


def _require_onnx() -> None:
    missing = []
    for name in ONNX_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UnetsegError(
            f"ONNX export needs the Python packages {', '.join(ONNX_PACKAGES)}; missing: {', '.join(missing)}. "
            f"Fix: pip install {' '.join(ONNX_PACKAGES)} (or export with --format torchscript)"
        )


def default_size(config: dict[str, Any], info) -> tuple[int, int]:
    """``eval_resize`` if the model was trained with it, else the most common image size
    over the splits of its dataset.json (keys ``"HxW"``), else 64x64."""
    from unetseg.options import size_pair

    resize = size_pair((config.get("data") or {}).get("eval_resize"), "eval_resize (in the model's config.yaml)")
    if resize is not None:
        return resize
    counts: Counter[tuple[int, int]] = Counter()
    for split in info.splits.values():
        counts.update(split.shapes())
    if not counts:
        return _FALLBACK_SIZE
    return max(counts.items(), key=lambda kv: (kv[1], -kv[0][0], -kv[0][1]))[0]


def _metadata(options, config: dict[str, Any], info) -> str:
    from unetseg import __version__
    mean, std = options.normalization()
    return json.dumps({
        "input": "image: float32 N x 3 x H x W, RGB scaled to [0, 1], then (x - mean) / std",
        "output": "logits: float32 N x num_classes x H x W; argmax over dim 1 gives class ids",
        "mean": list(mean),
        "std": list(std),
        "eval_resize": (config.get("data") or {}).get("eval_resize"),
        "classes": info.classes.to_dict(),
        "model": options.to_dict(),
        "unetseg_version": __version__,
    })


def _export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int, metadata: str,
                 num_classes: int) -> int:
    import onnx_ir as ir

    dim = torch.export.Dim
    dynamic = ({0: dim("batch", min=1), 2: dim("height", min=1), 3: dim("width", min=1)},)
    program = torch.onnx.export(
        model, (example,), dynamo=True, input_names=["image"], output_names=["logits"],
        dynamic_shapes=dynamic, opset_version=opset, verbose=False,
    )
    graph_model = program.model
    # The exporter names the output dims after a model's padding arithmetic (Min(height, 16*...));
    # a segmentation model's logits have the input's size, so they are the input's.
    graph_model.graph.outputs[0].shape = ir.Shape(["batch", num_classes, "height", "width"])
    graph_model.metadata_props[METADATA_KEY] = metadata
    program.save(path, external_data=False)
    return int(graph_model.opset_imports.get("", opset))


def _onnx_runner(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


@contextlib.contextmanager
def _quiet_torchscript():
    """Silence TorchScript's deprecation and tracer warnings (the numerical check is the real test)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def _export_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path, metadata: str) -> None:
    with _quiet_torchscript(), torch.no_grad():
        traced = torch.jit.trace(model, (example,), check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={TORCHSCRIPT_EXTRA_FILE: metadata})


def _torchscript_runner(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    with _quiet_torchscript():
        module = torch.jit.load(str(path), map_location="cpu")
    module.eval()

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(x)

    return run


def export(
    model_path: str | os.PathLike,
    format: str,
    out: str | os.PathLike,
    height: int | None = None,
    width: int | None = None,
    opset: int = DEFAULT_OPSET,
) -> ExportReport:
    """Export the model saved at ``model_path`` (a run dir, its best/ or final/ folder, or a
    training checkpoint ``checkpoints/step-N``) to ``out`` as ``format`` ("onnx" or
    "torchscript"); see the module docstring.
    ``height`` and ``width`` (both or neither) set the example input size."""
    from unetseg.checkpoint import load_model
    from unetseg.models import saved_model_options

    start = time.perf_counter()
    out = Path(out)
    _check_options(format, out, height, width, opset)

    model, config, info = load_model(model_path)
    model.eval()
    h, w = (height, width) if height is not None else default_size(config, info)
    generator = torch.Generator().manual_seed(0)
    options = saved_model_options(config)
    channels = options.in_channels
    example = torch.randn(1, channels, h, w, generator=generator)
    # A second size with other remainders modulo 2**depth, and a batch of two: the dynamic axes.
    second = torch.randn(2, channels, h // 2 + 3, w // 2 + 5, generator=generator)
    metadata = _metadata(options, config, info)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    opset_written: int | None = None
    try:
        if format == "onnx":
            opset_written = _export_onnx(model, example, tmp, opset, metadata, options.num_classes)
            if opset_written != opset:
                raise UnetsegError(f"opset {opset}: the exporter could only write opset {opset_written}. Fix: use --opset {opset_written}")
            run = _onnx_runner(tmp)
        else:
            _export_torchscript(model, example, tmp, metadata)
            run = _torchscript_runner(tmp)
        checks = [_check_against_eager(model, run, x, format, out) for x in (example, second)]
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportReport(path=out, format=format, opset=opset_written, example_size=(h, w), checks=checks,
                        seconds=time.perf_counter() - start)


def _check_options(format: str, out: Path, height: int | None, width: int | None, opset: int) -> None:
    if format not in FORMATS:
        raise UnetsegError(f"format {format!r}: not one of {', '.join(FORMATS)}. Fix: use --format onnx or --format torchscript")
    if out.is_dir():
        raise UnetsegError(f"--out {out}: a folder. Fix: give a file name, e.g. {out / ('model.onnx' if format == 'onnx' else 'model.pt')}")
    if (height is None) != (width is None):
        raise UnetsegError(f"height {height!r} and width {width!r}: give both or neither")
    for name, value in (("height", height), ("width", width)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UnetsegError(f"{name} {value!r}: must be a whole number >= 1")
    if format == "onnx":
        if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
            raise UnetsegError(
                f"opset {opset!r}: the torch.export-based ONNX exporter writes opset {MIN_OPSET} or newer. "
                f"Fix: use opset {DEFAULT_OPSET} or newer"
            )
        _require_onnx()


def _check_against_eager(model, run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, format: str,
                         out: Path) -> tuple[tuple[int, ...], float, float]:
    """(input shape, max |exported - eager|, tolerance) for one input, or an error that
    says the file is not written."""
    with torch.inference_mode():
        expected = model(x)
    got = run(x)
    shape = tuple(x.shape)
    if tuple(got.shape) != tuple(expected.shape):
        raise UnetsegError(
            f"the exported {format} model gives logits of shape {tuple(got.shape)} for an input of shape "
            f"{shape}, the eager model {tuple(expected.shape)}. Fix: report this as a bug; export with "
            f"--height/--width set to the size you will run it at"
        )
    diff = float((got.float() - expected).abs().max())
    tolerance = RTOL * max(1.0, float(expected.abs().max()))
    if not diff <= tolerance:  # also catches NaN
        raise UnetsegError(
            f"the exported {format} model differs from the eager model by up to {diff:.3g} on a random input "
            f"of shape {shape} (tolerance {tolerance:.3g}); nothing was written to {out}. Fix: try the other "
            f"format, or report this as a bug with your torch and onnxruntime versions"
        )
    return shape, diff, tolerance


def main_export(model: str | os.PathLike, format: str, out: str | os.PathLike) -> int:
    """``unetseg export``: run :func:`export` and print what was written and checked.
    Returns 0; a :class:`UnetsegError` (bad option, missing package, failed check)
    propagates to the CLI, which prints it and exits 1."""
    from rich.console import Console

    stdout = Console(soft_wrap=True)
    report = export(model, format, out)
    what = f"onnx, opset {report.opset}" if report.format == "onnx" else "torchscript"
    checked = ", ".join(f"{diff:.2g} at {'x'.join(map(str, shape))}" for shape, diff, _ in report.checks)
    stdout.print(
        f"wrote {report.path} ({what}; input 'image' N x 3 x H x W normalised RGB, output 'logits' "
        f"N x C x H x W; batch, height and width dynamic) in {report.seconds:.1f} s\n"
        f"checked against the eager model: max |diff| {checked} (tolerance {report.checks[0][2]:.2g})",
        markup=False, highlight=False,
    )
    return 0
