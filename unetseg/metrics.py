"""Exact semantic-segmentation metrics from a confusion matrix, on any number of processes.

Every metric reported here (per-class IoU, accuracy and Dice, their means, pixel
accuracy, frequency-weighted IoU) is a function of one ``num_classes x num_classes``
integer matrix of (ground truth, prediction) pixel counts. Integer sums do not
depend on order or grouping, so the matrix of a whole evaluation is the sum of
the matrices of its batches, and of its processes: the global mIoU of a
distributed evaluation is exact after a single all-reduce of
``num_classes**2 + 1`` int64 numbers, however unevenly the samples were split
between ranks. The common alternatives are either wrong (averaging per-rank mIoU
is a mean of ratios; gathering through a padded ``DistributedSampler`` counts
some samples twice) or slow (all-gathering every prediction map to every rank).

The number of samples is counted alongside the pixels so that an evaluation can
check that every sample was seen exactly once, ``num_samples == len(dataset)``,
which catches padding and dropped batches.

Typical use in an evaluation loop::

    cm = ConfusionMatrix(num_classes=11, ignore_index=255, class_names=names)
    for images, masks in loader:                 # each rank sees its own shard
        cm.update(model(images), masks)          # logits (N, C, H, W) or indices
    result = cm.reduce().compute()               # every rank must call reduce()
    assert result.num_samples == len(dataset)
    print(result)                                # per-class table
    log(result.to_dict())                        # JSON-ready, fractions in 0..1
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from unetseg.distributed import all_reduce_sum, is_dist

__all__ = ["ConfusionMatrix", "SegmentationMetrics"]


def _nan_to_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def _percent(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.2f}"


@dataclass(frozen=True)
class SegmentationMetrics:
    """Metrics computed in float64 from a confusion matrix; all rates are fractions in [0, 1].

    Per class ``c``, with ``tp`` the diagonal entry, ``gt`` the row sum (pixels of
    ``c`` in the ground truth) and ``pred`` the column sum (pixels predicted as ``c``):

    - ``iou = tp / (gt + pred - tp)``
    - ``accuracy = tp / gt`` (recall)
    - ``dice = 2 tp / (gt + pred)``

    A metric whose denominator is zero is NaN: IoU and Dice of a class absent
    from both ground truth and prediction, accuracy of a class absent from the
    ground truth. NaN entries are left out of the means (``miou``,
    ``mean_accuracy``, ``mean_dice``), so a class that never occurs neither
    helps nor hurts; a class that is predicted but never present has IoU 0 and
    does count. When ``ignore_index`` is itself a class index its metrics are NaN.
    ``pixel_accuracy`` is the diagonal over all counted pixels, ``fw_iou`` the
    IoU weighted by each class's share of ground-truth pixels. With no counted
    pixels at all, every metric is NaN.

    ``to_dict()`` gives the same numbers as fractions with NaN turned into
    ``None`` (JSON ``null``); ``str()`` renders a table in percent.
    """

    class_names: tuple[str, ...]
    iou: tuple[float, ...]
    accuracy: tuple[float, ...]
    dice: tuple[float, ...]
    pixels: tuple[int, ...]
    miou: float
    mean_accuracy: float
    mean_dice: float
    pixel_accuracy: float
    fw_iou: float
    num_samples: int
    num_pixels: int
    confusion_matrix: tuple[tuple[int, ...], ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary: fractions in [0, 1], NaN as ``None``.

        Keys: ``mIoU``, ``mDice``, ``pixel_accuracy``, ``mean_accuracy``,
        ``fwIoU``, ``num_samples``, ``num_pixels`` (ground-truth pixels that were
        counted, i.e. not ignored), ``per_class`` (``{name: {"iou", "accuracy",
        "dice", "pixels"}}``) and ``confusion_matrix`` (rows ground truth,
        columns prediction, as lists of ints).
        """
        return {
            "mIoU": _nan_to_none(self.miou),
            "mDice": _nan_to_none(self.mean_dice),
            "pixel_accuracy": _nan_to_none(self.pixel_accuracy),
            "mean_accuracy": _nan_to_none(self.mean_accuracy),
            "fwIoU": _nan_to_none(self.fw_iou),
            "num_samples": self.num_samples,
            "num_pixels": self.num_pixels,
            "per_class": {
                name: {
                    "iou": _nan_to_none(iou),
                    "accuracy": _nan_to_none(acc),
                    "dice": _nan_to_none(dice),
                    "pixels": pixels,
                }
                for name, iou, acc, dice, pixels in zip(
                    self.class_names, self.iou, self.accuracy, self.dice, self.pixels, strict=True
                )
            },
            "confusion_matrix": [list(row) for row in self.confusion_matrix],
        }

    def table(self) -> Table:
        """A ``rich`` table of per-class IoU, accuracy and Dice in percent, with the means.

        Undefined (NaN) entries show as ``-``; they are left out of the means.
        """
        table = Table(
            title=f"{self.num_samples} samples, {self.num_pixels} pixels",
            caption=f"pixel accuracy {_percent(self.pixel_accuracy)}%  fwIoU {_percent(self.fw_iou)}%",
        )
        table.add_column("class")
        for column in ("IoU %", "acc %", "Dice %", "pixels"):
            table.add_column(column, justify="right")
        for name, iou, acc, dice, pixels in zip(
            self.class_names, self.iou, self.accuracy, self.dice, self.pixels, strict=True
        ):
            table.add_row(name, _percent(iou), _percent(acc), _percent(dice), str(pixels))
        table.add_section()
        table.add_row(
            "mean",
            _percent(self.miou),
            _percent(self.mean_accuracy),
            _percent(self.mean_dice),
            str(self.num_pixels),
            style="bold",
        )
        return table

    def __str__(self) -> str:
        buffer = io.StringIO()
        Console(file=buffer, width=100, color_system=None, force_terminal=False).print(self.table())
        return buffer.getvalue().rstrip("\n")


class ConfusionMatrix:
    """Accumulates a ``num_classes x num_classes`` int64 confusion matrix and a sample count.

    Rows are ground-truth classes, columns predicted classes. Target pixels equal
    to ``ignore_index`` or outside ``[0, num_classes)`` are not counted (their
    predictions are still checked). The matrix lives on the device of the last
    tensors passed to :meth:`update`, so accumulation never copies predictions
    to the host.

    In a distributed run each process updates with its own samples and then
    every process calls :meth:`reduce`, which sums matrices and sample counts
    with one all-reduce and returns a new object holding the totals; the local
    object is left as it was, so calling ``reduce()`` twice never double-counts.

    Args:
        num_classes: number of classes, i.e. of logit channels.
        ignore_index: target value to skip, e.g. 255 for "void"; if it lies in
            ``[0, num_classes)`` that class's metrics are NaN and it is left out
            of the means, while predictions of it on counted pixels stay errors.
        class_names: one name per class for tables and ``to_dict()``; defaults
            to ``"0"``, ``"1"``, ...
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
            raise ValueError(f"ignore_index must be an int or None, got {ignore_index!r}")
        if class_names is None:
            names = tuple(str(c) for c in range(num_classes))
        else:
            names = tuple(str(name) for name in class_names)
            if len(names) != num_classes:
                raise ValueError(
                    f"got {len(names)} class_names for num_classes={num_classes}; pass exactly one name per class"
                )
            if len(set(names)) != len(names):
                duplicates = sorted({name for name in names if names.count(name) > 1})
                raise ValueError(f"class_names must be unique, these repeat: {duplicates}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = names
        self.matrix = torch.zeros((num_classes, num_classes), dtype=torch.int64)
        self.num_samples = 0
        self.reduced = False

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
            f"num_samples={self.num_samples}, reduced={self.reduced})"
        )

    def _as_batch(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Validate shapes and dtypes; return (N, H, W) class indices, target, and whether
        the indices still need a range check (argmax of C logits cannot leave [0, C))."""
        if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
            raise TypeError(f"pred and target must be tensors, got {type(pred).__name__} and {type(target).__name__}")
        pred_shape, target_shape = tuple(pred.shape), tuple(target.shape)
        if target.dtype.is_floating_point or target.dtype.is_complex:
            raise TypeError(
                f"target must hold integer class indices, got dtype {target.dtype}; convert it with .long()"
            )
        if target.ndim == 2:
            pred, target = pred.unsqueeze(0), target.unsqueeze(0)
        elif target.ndim != 3:
            hint = ""
            if target.ndim == 4 and target.shape[1] == 1:
                hint = "; drop the channel dimension with target.squeeze(1)"
            raise ValueError(f"target must have shape (N, H, W) or (H, W), got {target_shape}{hint}")
        if pred.device != target.device:
            raise ValueError(
                f"pred is on {pred.device} but target is on {target.device}; move both to the same device"
            )
        n = self.num_classes
        if pred.ndim == target.ndim + 1:
            if not pred.dtype.is_floating_point:
                raise TypeError(
                    f"pred of shape {pred_shape} looks like logits (N, C, H, W) but has dtype {pred.dtype}; "
                    f"pass floating-point logits or class indices shaped like target {target_shape}"
                )
            if pred.shape[1] != n:
                raise ValueError(
                    f"logits of shape {pred_shape} have {pred.shape[1]} channels but num_classes={n}; "
                    "the channel dimension (dim 1 for a batch, dim 0 for one sample) must equal num_classes"
                )
            if (pred.shape[0], *pred.shape[2:]) != target.shape:
                raise ValueError(
                    f"logits of shape {pred_shape} do not match target of shape {target_shape}; "
                    "expected logits (N, C, H, W) with target (N, H, W), or (C, H, W) with (H, W)"
                )
            # Same indices as argmax (both return the first maximum), but on the CPU
            # max(dim).indices is several times faster than argmax over a non-last dim.
            return pred.max(dim=1).indices, target, False
        if pred.shape != target.shape:
            raise ValueError(
                f"pred of shape {pred_shape} does not match target of shape {target_shape}; pass class "
                "indices shaped like target, or logits with one extra class dimension (N, C, H, W)"
            )
        if pred.dtype.is_floating_point or pred.dtype.is_complex:
            raise TypeError(
                f"pred has the target's shape {pred_shape} but dtype {pred.dtype}; pass integer class "
                "indices (e.g. logits.argmax(1)) or the logits themselves, shaped (N, C, H, W)"
            )
        return pred, target, True

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Count one batch.

        Args:
            pred: class indices shaped like ``target``, or logits/scores with a
                class dimension, ``(N, C, H, W)`` (``(C, H, W)`` for one sample),
                from which the argmax over ``C`` is taken.
            target: integer ground truth ``(N, H, W)``, or ``(H, W)`` for one sample.

        Raises ``ValueError`` for mismatched shapes or devices and for class
        indices outside ``[0, num_classes)`` in ``pred`` (the batch is then not
        counted), ``TypeError`` for floating-point targets or index predictions.
        """
        if self.reduced:
            raise RuntimeError(
                "this ConfusionMatrix holds totals returned by reduce(); update the local "
                "ConfusionMatrix and call reduce() on it again"
            )
        pred, target, check_pred = self._as_batch(pred, target)
        n = self.num_classes
        if self.matrix.device != target.device:
            self.matrix = self.matrix.to(target.device)
        # One flat index per pixel into n*n + 2 bins: the n*n matrix cells, one bin
        # for uncounted targets and one for invalid predictions, so a single
        # bincount does the counting, the filtering and the range check.
        index = target.long() * n
        index += pred
        skip = (target < 0) | (target >= n)
        if self.ignore_index is not None and 0 <= self.ignore_index < n:
            skip |= target == self.ignore_index
        index.masked_fill_(skip, n * n)
        if check_pred:
            index.masked_fill_((pred < 0) | (pred >= n), n * n + 1)
        counts = torch.bincount(index.flatten(), minlength=n * n + 2)
        # On CUDA, bincount already waits for the device to size its output, so
        # reading the invalid-prediction count here adds little.
        if check_pred and (num_bad := int(counts[n * n + 1])):
            bad = pred[(pred < 0) | (pred >= n)]
            examples = torch.unique(bad)[:5].tolist()
            raise ValueError(
                f"pred has {num_bad} class indices outside [0, {n}), e.g. {examples}; predictions must "
                f"be in [0, num_classes={n}): check num_classes, or pass the logits (N, C, H, W) instead"
            )
        self.matrix += counts[: n * n].view(n, n)
        self.num_samples += target.shape[0]

    def reduce(self) -> ConfusionMatrix:
        """Return a new ConfusionMatrix with the matrix and sample count summed over all processes.

        This is a collective: in a distributed run every process must call it,
        with the same ``num_classes``. The matrix and the sample count travel
        packed in one int64 tensor, so it is a single all-reduce of
        ``num_classes**2 + 1`` numbers (on the GPU for NCCL, see
        :func:`unetseg.distributed.all_reduce_sum`). Without a process group it
        is a copy.

        ``self`` is not modified, so calling ``reduce()`` on it twice gives the
        same totals twice. The returned object is marked ``reduced``: calling
        ``reduce()`` on it returns a copy without communicating, and
        ``update()`` on it raises.
        """
        out = self.clone()
        out.reduced = True
        if self.reduced or not is_dist():
            return out
        n = self.num_classes
        packed = torch.cat([self.matrix.flatten(), self.matrix.new_tensor([self.num_samples])])
        all_reduce_sum(packed)
        out.matrix = packed[: n * n].reshape(n, n).clone()
        out.num_samples = int(packed[n * n])
        return out

    def clone(self) -> ConfusionMatrix:
        """An independent copy (same device, same ``reduced`` flag)."""
        out = type(self)(self.num_classes, self.ignore_index, self.class_names)
        out.matrix = self.matrix.clone()
        out.num_samples = self.num_samples
        out.reduced = self.reduced
        return out

    def compute(self) -> SegmentationMetrics:
        """Metrics of the counts held here, in float64 (see :class:`SegmentationMetrics`).

        This does not communicate: in a distributed run call it on the result of
        :meth:`reduce`, otherwise it describes this process's samples only.
        """
        counts = self.matrix.detach().cpu()
        mat = counts.to(torch.float64)
        tp = mat.diagonal()
        gt = mat.sum(dim=1)
        predicted = mat.sum(dim=0)
        total = mat.sum()
        # Zero denominators give 0/0 = NaN, which is the intended "undefined".
        iou = tp / (gt + predicted - tp)
        accuracy = tp / gt
        dice = 2 * tp / (gt + predicted)
        if self.ignore_index is not None and 0 <= self.ignore_index < self.num_classes:
            for values in (iou, accuracy, dice):
                values[self.ignore_index] = math.nan

        def nanmean(values: torch.Tensor) -> float:
            defined = values[~values.isnan()]
            return defined.mean().item() if defined.numel() else math.nan

        defined_iou = ~iou.isnan()
        fw_iou = (gt[defined_iou] * iou[defined_iou]).sum() / total
        return SegmentationMetrics(
            class_names=self.class_names,
            iou=tuple(iou.tolist()),
            accuracy=tuple(accuracy.tolist()),
            dice=tuple(dice.tolist()),
            pixels=tuple(counts.sum(dim=1).tolist()),
            miou=nanmean(iou),
            mean_accuracy=nanmean(accuracy),
            mean_dice=nanmean(dice),
            pixel_accuracy=(tp.sum() / total).item(),
            fw_iou=fw_iou.item(),
            num_samples=self.num_samples,
            num_pixels=int(counts.sum()),
            confusion_matrix=tuple(tuple(row) for row in counts.tolist()),
        )
