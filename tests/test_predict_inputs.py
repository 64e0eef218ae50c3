"""unetseg.predict_inputs: which files are read (order, each once, typos are errors) and
which names are written (clashing stems renamed, inputs never overwritten). No model."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import clashing_images
from unetseg.errors import UnetsegError
from unetseg.predict_inputs import check_out_dir, collect_inputs, output_paths, output_stems


def test_glob_then_file_in_order_each_once(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "b").mkdir()
    for name in ("p1", "p2", "p3"):
        Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(tmp_path / "b" / f"{name}.png")
    Image.fromarray(rng.integers(0, 256, (33, 17, 3), dtype=np.uint8)).save(tmp_path / "single.bmp")

    inputs = [str(tmp_path / "b" / "*.png"), str(tmp_path / "single.bmp"), str(tmp_path / "b" / "p2.png")]
    assert [p.name for p in collect_inputs(inputs)] == ["p1.png", "p2.png", "p3.png", "single.bmp"]


def test_folder_skips_hidden_and_other_extensions(tmp_path):
    for name in ("b.JPG", "a.png", ".hidden.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.png").write_bytes(b"")
    assert [p.name for p in collect_inputs(tmp_path)] == ["a.png", "b.JPG"]


def test_shared_stems_get_distinct_names(tmp_path):
    paths = clashing_images(tmp_path)
    stems = output_stems(paths)
    assert stems == ["a__x_png", "b__x", "a__x_jpg", "a__x_color_png", "y"]
    assert output_stems(paths) == stems  # deterministic


def test_input_errors_name_the_input(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnetsegError, match=r"nothing-\*\.jpg.*matches no image"):
        collect_inputs([str(tmp_path / "nothing-*.jpg")])
    with pytest.raises(UnetsegError, match="missing.png: no such file"):
        collect_inputs([str(tmp_path / "missing.png")])
    with pytest.raises(UnetsegError, match="empty: no image files"):
        collect_inputs([str(tmp_path / "empty")])
    with pytest.raises(UnetsegError, match="no inputs given"):
        collect_inputs([])


def test_output_paths_overlay_only_when_asked(tmp_path):
    assert output_paths(tmp_path, "x", overlay=False) == {"ids": tmp_path / "x.png", "color": tmp_path / "x_color.png"}
    assert output_paths(tmp_path, "x", overlay=True)["overlay"] == tmp_path / "x_overlay.png"


def test_out_dir_must_be_a_folder_that_replaces_no_input(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(UnetsegError, match="a file, not a folder"):
        check_out_dir(tmp_path / "file", [tmp_path / "a.png"], ["a"], overlay=False)
    with pytest.raises(UnetsegError, match="a.png there would replace the input"):
        check_out_dir(tmp_path, [tmp_path / "a.png"], ["a"], overlay=False)
    (tmp_path / "x_overlay.png").write_bytes(b"")
    check_out_dir(tmp_path, [tmp_path / "x_overlay.png"], ["x"], overlay=False)  # no overlay written
    with pytest.raises(UnetsegError, match="x_overlay.png there would replace the input"):
        check_out_dir(tmp_path, [tmp_path / "x_overlay.png"], ["x"], overlay=True)
    check_out_dir(tmp_path / "new", [tmp_path / "a.png"], ["a"], overlay=True)  # missing: fine, created later
