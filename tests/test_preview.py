"""unetseg shards preview: the grid is written whole, shows the masks, and the augmented
grid differs from the packed one."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import make
from unetseg.errors import UnetsegError
from unetseg.preview import preview


def test_preview_writes_a_grid_and_the_augmented_one_differs(tmp_path):
    data = make(tmp_path, "syn", train=6, val=2, size="32x40")
    plain = preview(data, tmp_path / "out" / "plain.png", n=5)
    augmented = preview(data, tmp_path / "out" / "aug.png", n=5, augmented=True)
    a, b = np.asarray(Image.open(plain).convert("RGB")), np.asarray(Image.open(augmented).convert("RGB"))
    assert a.shape[0] > 100 and a.shape[1] > 100
    assert a.shape != b.shape or (a != b).any()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["aug.png", "plain.png"]  # no temporary left
    no_overlay = np.asarray(Image.open(preview(data, tmp_path / "raw.png", n=5, alpha=0.0)).convert("RGB"))
    assert (no_overlay != a).any()  # the masks' colours are over the images


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 0}, "--n 0"),
    ({"alpha": 2.0}, "--alpha 2.0"),
    ({"split": "test"}, "no split 'test'"),
])
def test_bad_options_name_the_value(tmp_path, kwargs, message):
    data = make(tmp_path, "syn", train=2, val=2, size="16x16")
    with pytest.raises(UnetsegError, match=message):
        preview(data, tmp_path / "p.png", **kwargs)
    assert not (tmp_path / "p.png").exists()
