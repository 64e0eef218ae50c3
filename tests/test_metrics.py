"""Tests for unetseg.metrics.ConfusionMatrix and unetseg.distributed.

The counts are checked against a plain numpy reference and torchmetrics; the
distributed reduction against one process on all data, with real gloo
processes started by torchrun and accelerate launch.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassJaccardIndex

from unetseg import distributed
from unetseg.metrics import ConfusionMatrix

sys.path.insert(0, str(Path(__file__).resolve().parent))
from multiproc import free_port, run_distributed  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "scripts" / "metrics_worker.py"
NAN = math.nan


# --------------------------------------------------------------------------- reference


def reference_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None
) -> np.ndarray:
    """Confusion matrix by scattering one pixel at a time (np.add.at), rows = ground truth."""
    p = pred.numpy().astype(np.int64).ravel()
    t = target.numpy().astype(np.int64).ravel()
    keep = (t >= 0) & (t < num_classes)
    if ignore_index is not None:
        keep &= t != ignore_index
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (t[keep], p[keep]), 1)
    return matrix


def reference_metrics(matrix: np.ndarray, ignore_index: int | None) -> dict:
    """The documented definitions, written out class by class."""
    n = matrix.shape[0]
    total = int(matrix.sum())
    iou, acc, dice = [], [], []
    for c in range(n):
        tp = int(matrix[c, c])
        gt = int(matrix[c, :].sum())
        pr = int(matrix[:, c].sum())
        ignored = ignore_index is not None and ignore_index == c
        iou.append(NAN if ignored or gt + pr - tp == 0 else tp / (gt + pr - tp))
        acc.append(NAN if ignored or gt == 0 else tp / gt)
        dice.append(NAN if ignored or gt + pr == 0 else 2 * tp / (gt + pr))

    def mean_defined(values: list[float]) -> float:
        defined = [v for v in values if not math.isnan(v)]
        return sum(defined) / len(defined) if defined else NAN

    fw = NAN
    if total:
        fw = sum(int(matrix[c, :].sum()) / total * iou[c] for c in range(n) if not math.isnan(iou[c]))
    return {
        "iou": iou,
        "accuracy": acc,
        "dice": dice,
        "mIoU": mean_defined(iou),
        "mean_accuracy": mean_defined(acc),
        "mDice": mean_defined(dice),
        "pixel_accuracy": int(np.trace(matrix)) / total if total else NAN,
        "fwIoU": fw,
    }


def same(actual: float | None, expected: float) -> bool:
    """Equal up to float64 rounding, with None (JSON null) standing for NaN."""
    if math.isnan(expected):
        return actual is None
    return actual is not None and math.isclose(actual, expected, rel_tol=1e-12, abs_tol=1e-15)


def assert_matches_reference(result: dict, matrix: np.ndarray, ignore_index: int | None) -> None:
    ref = reference_metrics(matrix, ignore_index)
    assert result["confusion_matrix"] == matrix.tolist()
    assert result["num_pixels"] == int(matrix.sum())
    for key in ("mIoU", "mean_accuracy", "mDice", "pixel_accuracy", "fwIoU"):
        assert same(result[key], ref[key]), (key, result[key], ref[key])
    for c, stats in enumerate(result["per_class"].values()):
        assert stats["pixels"] == int(matrix[c].sum())
        for key in ("iou", "accuracy", "dice"):
            assert same(stats[key], ref[key][c]), (c, key, stats[key], ref[key][c])


def random_batch(
    generator: torch.Generator,
    shape: tuple[int, ...],
    num_classes: int,
    ignore_index: int | None,
    dtype: torch.dtype = torch.int64,
    stray: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target with ~10% ignore pixels (and optionally stray out-of-range labels) and a
    prediction that agrees with it on about half the pixels."""
    target = torch.randint(0, num_classes, shape, generator=generator)
    if ignore_index is not None:
        target[torch.rand(shape, generator=generator) < 0.1] = ignore_index
    if stray:
        target[torch.rand(shape, generator=generator) < 0.05] = num_classes + 3
        if dtype != torch.uint8:
            target[torch.rand(shape, generator=generator) < 0.05] = -7
    pred = torch.randint(0, num_classes, shape, generator=generator)
    agree = (torch.rand(shape, generator=generator) < 0.5) & (target >= 0) & (target < num_classes)
    pred[agree] = target[agree]
    return pred, target.to(dtype)


# --------------------------------------------------------------------------- counting


@pytest.mark.parametrize(
    ("num_classes", "shape", "ignore_index", "dtype", "stray"),
    [
        (1, (2, 5, 7), None, torch.int64, False),
        (2, (1, 1, 1), 255, torch.uint8, False),
        (3, (4, 16, 9), -1, torch.int64, True),
        (5, (3, 1, 100), 255, torch.uint8, True),
        (7, (5, 12, 10), 3, torch.int64, False),
        (11, (8, 36, 48), 255, torch.uint8, False),
        (19, (2, 64, 64), 255, torch.int32, True),
        (150, (2, 32, 32), 0, torch.int64, False),
    ],
)
def test_matches_numpy_reference(num_classes, shape, ignore_index, dtype, stray):
    generator = torch.Generator().manual_seed(num_classes)
    pred, target = random_batch(generator, shape, num_classes, ignore_index, dtype, stray)
    cm = ConfusionMatrix(num_classes, ignore_index=ignore_index)
    # Uneven batches, the last one as a single 2-D sample, must add up to the whole.
    n = shape[0]
    cm.update(pred[: n // 2], target[: n // 2])
    if n > 1:
        cm.update(pred[n // 2 : n - 1], target[n // 2 : n - 1])
    cm.update(pred[n - 1], target[n - 1])

    expected = reference_matrix(pred, target, num_classes, ignore_index)
    assert cm.matrix.dtype == torch.int64
    assert cm.matrix.tolist() == expected.tolist()
    assert cm.num_samples == n
    result = cm.compute().to_dict()
    assert result["num_samples"] == n
    assert_matches_reference(result, expected, ignore_index)


def test_inputs_are_not_modified():
    generator = torch.Generator().manual_seed(1)
    pred, target = random_batch(generator, (2, 8, 8), 4, 255)
    pred_copy, target_copy = pred.clone(), target.clone()
    ConfusionMatrix(4, ignore_index=255).update(pred, target)
    assert torch.equal(pred, pred_copy) and torch.equal(target, target_copy)


@pytest.mark.parametrize("ignore_index", [None, 255, 2])
@pytest.mark.parametrize(("num_classes", "shape"), [(4, (3, 20, 30)), (11, (2, 45, 60))])
def test_agrees_with_torchmetrics(num_classes, shape, ignore_index):
    generator = torch.Generator().manual_seed(100 + num_classes)
    pred, target = random_batch(generator, shape, num_classes, ignore_index)
    cm = ConfusionMatrix(num_classes, ignore_index=ignore_index)
    tm_matrix = MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index)
    tm_iou = MulticlassJaccardIndex(num_classes, average=None, ignore_index=ignore_index)
    tm_miou = MulticlassJaccardIndex(num_classes, average="macro", ignore_index=ignore_index)
    for metric in (cm, tm_matrix, tm_iou, tm_miou):
        metric.update(pred, target)

    assert cm.matrix.tolist() == tm_matrix.compute().tolist()
    ours = cm.compute()
    theirs = tm_iou.compute().double()
    # torchmetrics reports 0 where we report NaN (undefined); compare where both define IoU.
    defined = [c for c in range(num_classes) if not math.isnan(ours.iou[c])]
    assert len(defined) >= num_classes - 1
    assert torch.allclose(torch.tensor([ours.iou[c] for c in defined], dtype=torch.float64), theirs[defined], rtol=1e-6)
    # Its macro average leaves out the ignore_index class and classes absent from both,
    # like ours; it computes in float32.
    assert math.isclose(ours.miou, tm_miou.compute().item(), rel_tol=1e-6)


def test_logits_agree_with_indices_and_torchmetrics():
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 5, 10, 12, generator=generator)
    target = torch.randint(0, 5, (3, 10, 12), generator=generator)
    target[0, :2] = 255
    from_logits = ConfusionMatrix(5, ignore_index=255)
    from_logits.update(logits, target)
    from_indices = ConfusionMatrix(5, ignore_index=255)
    from_indices.update(logits.argmax(1), target)
    tm = MulticlassConfusionMatrix(5, ignore_index=255)
    tm.update(logits, target)
    assert from_logits.matrix.tolist() == from_indices.matrix.tolist() == tm.compute().tolist()
    assert from_logits.num_samples == 3

    single = ConfusionMatrix(5, ignore_index=255)
    for i in range(3):
        single.update(logits[i], target[i])  # (C, H, W) with (H, W)
    assert single.matrix.tolist() == from_logits.matrix.tolist()
    assert single.num_samples == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_logits_with_ties_pick_the_first_maximum_like_argmax(dtype):
    generator = torch.Generator().manual_seed(11)
    logits = torch.randint(0, 3, (2, 6, 9, 7), generator=generator).to(dtype)  # many ties
    target = torch.randint(0, 6, (2, 9, 7), generator=generator)
    from_logits = ConfusionMatrix(6)
    from_logits.update(logits, target)
    assert from_logits.matrix.tolist() == reference_matrix(logits.argmax(1), target, 6, None).tolist()


# --------------------------------------------------------------------------- edge cases


def test_hand_computed_example():
    # pairs (target, pred), the 255 pixel ignored: (0,0) (0,1) (1,1) (1,1) (2,0)
    #   matrix rows=gt: [[1,1,0],[0,2,0],[1,0,0]];  gt = 2,2,1;  pred = 2,3,0
    #   IoU  = 1/(2+2-1)=1/3, 2/(2+3-2)=2/3, 0/(1+0-0)=0  -> mIoU 1/3
    #   acc  = 1/2, 2/2, 0/1                            -> mean 1/2, pixel acc 3/5
    #   Dice = 2/4, 4/5, 0                              -> mean 13/30
    #   fwIoU = (2*1/3 + 2*2/3 + 1*0) / 5 = 2/5
    cm = ConfusionMatrix(3, ignore_index=255, class_names=["road", "sky", "car"])
    cm.update(torch.tensor([[0, 1, 1], [1, 0, 2]]), torch.tensor([[0, 0, 1], [1, 2, 255]]))
    r = cm.compute().to_dict()
    assert r["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert math.isclose(r["mIoU"], 1 / 3)
    assert math.isclose(r["mean_accuracy"], 1 / 2)
    assert math.isclose(r["pixel_accuracy"], 3 / 5)
    assert math.isclose(r["mDice"], 13 / 30)
    assert math.isclose(r["fwIoU"], 2 / 5)
    assert math.isclose(r["per_class"]["sky"]["iou"], 2 / 3)
    assert math.isclose(r["per_class"]["road"]["dice"], 1 / 2)
    assert [v["pixels"] for v in r["per_class"].values()] == [2, 2, 1]
    assert (r["num_samples"], r["num_pixels"]) == (1, 5)


def test_class_absent_everywhere_is_nan_and_left_out_of_means():
    # pairs: (0,0) (1,1) (3,3) (3,1); class 2 neither in target nor predicted
    #   IoU = 1/(1+1-1)=1, 1/(1+2-1)=1/2, NaN, 1/(2+1-1)=1/2  -> mIoU (1+1/2+1/2)/3 = 2/3
    #   acc = 1, 1, NaN, 1/2                               -> mean 5/6
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([[0, 1, 3, 1]]), torch.tensor([[0, 1, 3, 3]]))
    result = cm.compute()
    assert math.isnan(result.iou[2]) and math.isnan(result.accuracy[2]) and math.isnan(result.dice[2])
    assert math.isclose(result.miou, 2 / 3)
    assert math.isclose(result.mean_accuracy, 5 / 6)
    as_json = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert as_json["per_class"]["2"] == {"iou": None, "accuracy": None, "dice": None, "pixels": 0}


def test_class_predicted_but_absent_counts_as_zero_iou():
    # pairs: (0,0) (0,2): class 2 predicted once, never present; class 1 absent everywhere
    #   IoU = 1/(2+1-1)=1/2, NaN, 0/(0+1-0)=0 -> mIoU 1/4;  acc = 1/2, NaN, NaN -> mean 1/2
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([[0, 2]]), torch.tensor([[0, 0]]))
    result = cm.compute()
    assert result.iou[2] == 0.0 and math.isnan(result.accuracy[2])
    assert math.isclose(result.miou, 1 / 4)
    assert math.isclose(result.mean_accuracy, 1 / 2)


def test_ignore_index_inside_class_range():
    # ignore_index=1 drops target pixels of class 1; predictions of 1 on counted pixels
    # are still errors. pairs: (0,0) (0,1) (2,2), the (1,0) pixel ignored
    #   IoU = 1/(2+1-1)=1/2, NaN (ignored class), 1/(1+1-1)=1 -> mIoU 3/4
    cm = ConfusionMatrix(3, ignore_index=1)
    cm.update(torch.tensor([[0, 1, 2, 0]]), torch.tensor([[0, 0, 2, 1]]))
    result = cm.compute()
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 0, 0], [0, 0, 1]]
    assert math.isnan(result.iou[1]) and math.isnan(result.dice[1])
    assert math.isclose(result.miou, 3 / 4)


def test_all_ignore_batch_counts_samples_but_no_pixels():
    cm = ConfusionMatrix(4, ignore_index=255)
    cm.update(torch.randint(0, 4, (3, 5, 5)), torch.full((3, 5, 5), 255, dtype=torch.uint8))
    assert cm.matrix.sum().item() == 0
    assert cm.num_samples == 3
    result = cm.compute()
    assert math.isnan(result.miou) and math.isnan(result.pixel_accuracy) and math.isnan(result.fw_iou)
    assert result.num_pixels == 0 and result.num_samples == 3


def test_empty_matrix_computes_nan_without_crashing():
    result = ConfusionMatrix(3, class_names=["a", "b", "c"]).compute()
    for value in (result.miou, result.mean_accuracy, result.mean_dice, result.pixel_accuracy, result.fw_iou):
        assert math.isnan(value)
    as_dict = result.to_dict()
    assert as_dict["mIoU"] is None and as_dict["num_pixels"] == 0 and as_dict["num_samples"] == 0
    json.dumps(as_dict, allow_nan=False)
    assert "a" in str(result)


def test_single_class():
    cm = ConfusionMatrix(1, ignore_index=255)
    target = torch.zeros(2, 4, 4, dtype=torch.int64)
    target[0, 0] = 255
    cm.update(torch.zeros(2, 4, 4, dtype=torch.int64), target)
    result = cm.compute()
    assert cm.matrix.tolist() == [[28]]  # 32 pixels, 4 ignored
    assert result.miou == 1.0 and result.pixel_accuracy == 1.0 and result.fw_iou == 1.0
    with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
        cm.update(torch.ones(1, 2, 2, dtype=torch.int64), torch.zeros(1, 2, 2, dtype=torch.int64))


def test_num_samples_counts_batch_and_single_samples():
    cm = ConfusionMatrix(3)
    cm.update(torch.zeros(4, 2, 2, dtype=torch.long), torch.zeros(4, 2, 2, dtype=torch.long))
    cm.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long))
    cm.update(torch.zeros(0, 2, 2, dtype=torch.long), torch.zeros(0, 2, 2, dtype=torch.long))
    assert cm.num_samples == 5
    assert cm.matrix[0, 0].item() == 20


def test_table_and_str():
    cm = ConfusionMatrix(3, ignore_index=255, class_names=["road", "sky", "car"])
    cm.update(torch.tensor([[0, 1, 1], [1, 0, 2]]), torch.tensor([[0, 0, 1], [1, 2, 255]]))
    text = str(cm.compute())
    for fragment in ("road", "sky", "car", "33.33", "66.67", "mean", "pixel accuracy 60.00%"):
        assert fragment in text


# --------------------------------------------------------------------------- errors


LONG, FLOAT = torch.int64, torch.float32


@pytest.mark.parametrize(
    ("pred_shape", "pred_dtype", "target_shape", "target_dtype", "error", "fragments"),
    [
        ((2, 4, 5), LONG, (2, 4, 6), LONG, ValueError, ["(2, 4, 5)", "(2, 4, 6)"]),
        ((2, 4, 4, 4), FLOAT, (2, 4, 4), LONG, ValueError, ["4 channels", "num_classes=3"]),
        ((2, 3, 4, 5), FLOAT, (2, 4, 4), LONG, ValueError, ["(2, 3, 4, 5)", "(2, 4, 4)"]),
        ((2, 4, 4), FLOAT, (2, 4, 4), LONG, TypeError, ["float32", "argmax"]),
        ((2, 3, 4, 4), LONG, (2, 4, 4), LONG, TypeError, ["logits", "int64"]),
        ((2, 4, 4), LONG, (2, 4, 4), FLOAT, TypeError, ["float32", ".long()"]),
        ((2, 1, 4, 4), LONG, (2, 1, 4, 4), LONG, ValueError, ["(2, 1, 4, 4)", "squeeze(1)"]),
        ((4,), LONG, (4,), LONG, ValueError, ["(N, H, W)", "(4,)"]),
    ],
)
def test_input_errors_name_the_problem(pred_shape, pred_dtype, target_shape, target_dtype, error, fragments):
    cm = ConfusionMatrix(3)
    with pytest.raises(error) as info:
        cm.update(torch.zeros(pred_shape, dtype=pred_dtype), torch.zeros(target_shape, dtype=target_dtype))
    for fragment in fragments:
        assert fragment in str(info.value)
    assert cm.num_samples == 0


@pytest.mark.parametrize("bad_value", [3, 7, -1])
def test_predictions_out_of_range_raise_and_count_nothing(bad_value):
    cm = ConfusionMatrix(3, ignore_index=255)
    cm.update(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]))
    pred = torch.tensor([[0, 1, 2, bad_value]])
    with pytest.raises(ValueError) as info:
        cm.update(pred, torch.tensor([[0, 1, 2, 255]]))  # even on an ignored pixel
    message = str(info.value)
    assert "1 class indices outside [0, 3)" in message and f"[{bad_value}]" in message
    assert cm.matrix.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 0]] and cm.num_samples == 1


def test_constructor_errors():
    with pytest.raises(ValueError, match="positive int, got 0"):
        ConfusionMatrix(0)
    with pytest.raises(ValueError, match="2 class_names for num_classes=3"):
        ConfusionMatrix(3, class_names=["a", "b"])
    with pytest.raises(ValueError, match=r"repeat: \['a'\]"):
        ConfusionMatrix(3, class_names=["a", "b", "a"])


# --------------------------------------------------------------------------- reduce, single process


def test_reduce_without_process_group_is_a_marked_copy():
    assert not distributed.is_dist()
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([[0, 1, 2]]), torch.tensor([[0, 1, 1]]))
    reduced = cm.reduce()
    assert reduced is not cm and reduced.reduced and not cm.reduced
    assert reduced.matrix.tolist() == cm.matrix.tolist() and reduced.num_samples == 1
    assert reduced.reduce().matrix.tolist() == cm.matrix.tolist()
    reduced.matrix[0, 0] += 5  # independent storage
    assert cm.matrix[0, 0].item() == 1
    with pytest.raises(RuntimeError, match="reduce"):
        reduced.update(torch.tensor([[0]]), torch.tensor([[0]]))


def test_reduce_through_a_one_process_gloo_group(tmp_path):
    # Exercises the packing and all-reduce path in-process; world size 1 leaves the sums as they are.
    cm = ConfusionMatrix(4, ignore_index=255)
    generator = torch.Generator().manual_seed(5)
    cm.update(*random_batch(generator, (3, 6, 6), 4, 255))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert distributed.is_dist() and distributed.get_world_size() == 1 and distributed.get_rank() == 0
        reduced = cm.reduce()
        again = cm.reduce().reduce()
    finally:
        dist.destroy_process_group()
    for result in (reduced, again):
        assert result.matrix.tolist() == cm.matrix.tolist() and result.num_samples == 3 and result.reduced


# --------------------------------------------------------------------------- reduce, several processes

NUM_CLASSES, IGNORE = 11, 255
CASES = {"split_4_3": "4,3", "rank0_empty": "0,7", "rank1_empty": "7,0"}


def make_data(path: Path) -> dict:
    generator = torch.Generator().manual_seed(2024)
    pred, target = random_batch(generator, (7, 24, 32), NUM_CLASSES, IGNORE, torch.uint8)
    data = {"pred": pred, "target": target, "num_classes": NUM_CLASSES, "ignore_index": IGNORE}
    torch.save(data, path)
    return data


def single_process(data: dict, indices: list[int] | None = None) -> ConfusionMatrix:
    indices = list(range(data["target"].shape[0])) if indices is None else indices
    cm = ConfusionMatrix(data["num_classes"], ignore_index=data["ignore_index"])
    cm.update(data["pred"][indices], data["target"][indices])
    return cm


def load_ranks(out: Path, name: str, world_size: int) -> list[dict]:
    return [json.loads((out / f"{name}.rank{rank}.json").read_text()) for rank in range(world_size)]


def check_exact(records: list[dict], data: dict) -> None:
    """Every rank holds totals bitwise equal to one process on all 7 samples."""
    expected = single_process(data)
    assert expected.matrix.tolist() == reference_matrix(data["pred"], data["target"], NUM_CLASSES, IGNORE).tolist()
    assert sorted(i for r in records for i in r["indices"]) == list(range(7))
    local_sum = np.sum([r["local_matrix"] for r in records], axis=0)
    assert local_sum.tolist() == expected.matrix.tolist()
    for r in records:
        assert r["world_size"] == len(records)
        assert r["matrix"] == expected.matrix.tolist()
        assert r["num_samples"] == 7
        assert r["matrix_reduced_again"] == r["matrix"]  # reducing the local object again
        assert r["matrix_reduced_of_reduced"] == r["matrix"] and r["num_samples_reduced_of_reduced"] == 7
        assert r["local_matrix_after_reduce"] == r["local_matrix"]
        assert r["local_num_samples"] == len(r["indices"])
        assert r["metrics"] == expected.compute().to_dict()


@pytest.fixture(scope="module")
def torchrun_results(tmp_path_factory):
    """One torchrun launch with 2 gloo ranks evaluating every split in CASES (and a padding sampler)."""
    root = tmp_path_factory.mktemp("metrics_torchrun")
    data = make_data(root / "data.pt")
    cases = [f"{name}={split}" for name, split in {**CASES, "sampler": "sampler"}.items()]
    args = [str(WORKER), "--data", str(root / "data.pt"), "--out", str(root / "out")]
    for case in cases:
        args += ["--case", case]
    run_distributed(args, nproc=2, timeout=120, cwd=REPO)
    return data, root / "out"


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", list(CASES))
def test_two_gloo_ranks_match_one_process(torchrun_results, name):
    data, out = torchrun_results
    records = load_ranks(out, name, 2)
    assert all(r["backend"] == "gloo" for r in records)
    check_exact(records, data)


@pytest.mark.multiprocess
def test_padding_sampler_duplicate_shows_in_num_samples(torchrun_results):
    # DistributedSampler pads 7 samples to 8 by repeating sample 0; the counts then
    # include it twice, and num_samples == 8 != 7 is what lets an evaluation notice.
    data, out = torchrun_results
    records = load_ranks(out, "sampler", 2)
    indices = sorted(i for r in records for i in r["indices"])
    assert indices == [0, 0, 1, 2, 3, 4, 5, 6]
    for r in records:
        assert r["num_samples"] == 8
        assert r["matrix"] == single_process(data, indices).matrix.tolist()
        assert r["matrix"] != single_process(data).matrix.tolist()


@pytest.mark.multiprocess
def test_three_ranks_one_empty(tmp_path):
    data = make_data(tmp_path / "data.pt")
    args = [str(WORKER), "--data", str(tmp_path / "data.pt"), "--out", str(tmp_path / "out"), "--case", "uneven=3,0,4"]
    run_distributed(args, nproc=3, timeout=120, cwd=REPO)
    check_exact(load_ranks(tmp_path / "out", "uneven", 3), data)


@pytest.mark.multiprocess
def test_accelerate_launch_process_group(tmp_path):
    data = make_data(tmp_path / "data.pt")
    args = [str(WORKER), "--init", "accelerate", "--data", str(tmp_path / "data.pt"), "--out", str(tmp_path / "out"),
            "--case", "uneven=5,2"]  # fmt: skip
    run_distributed(args, nproc=2, timeout=120, cwd=REPO, launcher="accelerate")
    check_exact(load_ranks(tmp_path / "out", "uneven", 2), data)


@pytest.mark.multiprocess
def test_run_distributed_reports_worker_output(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("import os, sys\nprint('hello from', os.environ['RANK'])\nsys.exit('rank failed on purpose')\n")
    with pytest.raises(AssertionError) as info:
        run_distributed([str(script)], nproc=2, timeout=60)
    message = str(info.value)
    assert "exited with status" in message and "hello from" in message and "rank failed on purpose" in message


@pytest.mark.multiprocess
@pytest.mark.slow
def test_run_distributed_timeout_kills_the_workers(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text(
        "import os, pathlib, sys, time\n"
        f"pathlib.Path({str(tmp_path)!r}, 'pid' + os.environ['RANK']).write_text(str(os.getpid()))\n"
        "print('worker started', flush=True)\n"
        "time.sleep(600)\n"
    )
    with pytest.raises(AssertionError, match="timed out after 12 s"):
        run_distributed([str(script)], nproc=2, timeout=12)
    pids = [int((tmp_path / f"pid{rank}").read_text()) for rank in range(2)]
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in pids if _is_running(pid)]
        time.sleep(0.1)
    assert not alive, f"workers {alive} outlived the timeout"


def _is_running(pid: int) -> bool:
    """True for a live process; False once it is gone or only a zombie awaiting its reaper."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_free_port_is_bindable():
    import socket

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
