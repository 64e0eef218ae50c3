"""Class weights from dataset.json pixel counts (unetseg.class_weights)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from unetseg.class_weights import class_weights
from unetseg.errors import UnetsegError

IGNORE = 255


def test_class_weights_none():
    assert class_weights("none", [1, 2, 3]) is None


def test_median_frequency_odd_number_of_classes():
    # counts 10, 30, 60 of 100 -> freq 0.1, 0.3, 0.6, median 0.3 -> 0.3/0.1, 0.3/0.3, 0.3/0.6
    w = class_weights("median_frequency", [10, 30, 60])
    assert w.dtype == torch.float32
    assert w.tolist() == pytest.approx([3.0, 1.0, 0.5])


def test_median_frequency_even_number_of_classes():
    # freq 0.1, 0.2, 0.3, 0.4; median = (0.2 + 0.3) / 2 = 0.25 -> 2.5, 1.25, 0.8333, 0.625
    w = class_weights("median_frequency", [10, 20, 30, 40])
    assert w.tolist() == pytest.approx([2.5, 1.25, 0.25 / 0.3, 0.625])


def test_inverse_log():
    # p = 0.25, 0.75 -> 1/ln(1.27) = 4.18380, 1/ln(1.77) = 1.75138
    w = class_weights("inverse_log", [25, 75])
    assert w.tolist() == pytest.approx([4.1838045679, 1.7513762200])
    assert w.tolist() == pytest.approx([1 / math.log(1.02 + 0.25), 1 / math.log(1.02 + 0.75)])


@pytest.mark.parametrize("kind", ["median_frequency", "inverse_log"])
def test_zero_count_class_gets_weight_zero_with_a_warning(kind):
    with pytest.warns(UserWarning, match=r"classes \[1\] have no labelled pixels"):
        w = class_weights(kind, [10, 0, 30, 60])
    assert w[1].item() == 0.0
    # the other weights are those of the classes that have pixels (median over 10, 30, 60)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        expected = class_weights(kind, [10, 30, 60])
    assert w[[0, 2, 3]].tolist() == pytest.approx(expected.tolist())


def test_ignored_classes_get_weight_zero():
    w = class_weights("median_frequency", [10, 30, 60, 1000], ignore=3)
    assert w.tolist() == pytest.approx([3.0, 1.0, 0.5, 0.0])
    # an ignore_index that is no class id (255) changes nothing
    assert class_weights("median_frequency", [10, 30, 60], ignore=IGNORE).tolist() == pytest.approx([3.0, 1.0, 0.5])


def test_class_weights_with_no_pixels_is_an_error():
    with pytest.raises(UnetsegError, match="no labelled pixel"):
        class_weights("inverse_log", [0, 0])


def test_explicit_weights():
    w = class_weights([1, 0.5, 2.0], [10, 20, 30])
    assert w.dtype == torch.float32 and w.tolist() == [1.0, 0.5, 2.0]


@pytest.mark.parametrize(
    "kind, needle",
    [
        ([1.0, 2.0], "2 weights [1.0, 2.0] for 3 classes"),
        ([1.0, -2.0, 1.0], "[-2.0]"),
        ([1.0, float("nan"), 1.0], "[nan]"),
        ([0.0, 0.0, 0.0], "every weight"),
        (["a", "b", "c"], "neither a kind nor a list of numbers"),
        ("median", "unknown kind 'median'"),
    ],
)
def test_class_weights_validation(kind, needle):
    with pytest.raises(UnetsegError, match="Fix:") as info:
        class_weights(kind, [10, 20, 30])
    assert needle in str(info.value)
