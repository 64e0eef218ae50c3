"""unetseg evaluate: exact metrics at full resolution, 1 = N processes, class checks, plots."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import direct_predictions, make_folders, train_tiny, write_classes
from multiproc import run_distributed
from unetseg.checkpoint import load_model
from unetseg.scoring import TTA
from unetseg.pack import pack
from unetseg.synth import synth

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny model trained for a few steps, and the shards it was trained on."""
    root = tmp_path_factory.mktemp("eval")
    synth(root / "syn", train=16, val=9, size="40x48", shard_size=4, workers=1, progress=False)
    return train_tiny(root / "syn", root / "run", "--max-steps", 8), root / "syn"


def evaluate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unetseg", "evaluate", *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=ENV)


def direct_matrix(model_dir: Path, data: Path, split: str = "val") -> np.ndarray:
    """The confusion matrix computed here, image by image, without the stream or the reducer."""
    matrix = None
    for _, target, pred, n, ignore in direct_predictions(model_dir, data, split):
        matrix = np.zeros((n, n), dtype=np.int64) if matrix is None else matrix
        keep = (target != ignore) & (target < n)
        np.add.at(matrix, (target[keep], pred[keep]), 1)
    return matrix


def test_report_agrees_with_a_direct_computation(tmp_path, trained):
    run_dir, data = trained
    out = tmp_path / "reports" / "report.json"
    result = evaluate(run_dir, "--data", data, "--split", "val", "--out", out, "--batch-size", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["num_samples"] == 9 == report["split_samples"]
    assert np.array_equal(np.array(report["confusion_matrix"]), direct_matrix(run_dir / "best", data))
    for key in ("mIoU", "pixel_accuracy", "mean_accuracy", "fwIoU", "per_class"):
        assert key in report
    assert "mIoU" in result.stdout and "background" in result.stdout
    for name in ("report_confusion.png", "report_iou.png"):
        png = out.parent / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_compiled_evaluation_compiles_once_and_gives_the_same_matrix(tmp_path, trained, capsys, monkeypatch):
    """`--compile on` (torch.compile's graphs run eagerly, no inductor): 9 samples in
    batches of 2 (the last short) go through one graph, and the matrix is the eager one."""
    import functools

    from torch._dynamo.testing import CompileCounter

    from conftest import run_main

    run_dir, data = trained
    counter = CompileCounter()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counter))
    out = tmp_path / "report.json"
    code, _, err = run_main("evaluate", [run_dir, "--data", data, "--out", out, "--batch-size", "2", "--num-workers", "0",
                                         "--compile", "on"], capsys)
    assert code == 0, err
    assert counter.frame_count == 1
    assert np.array_equal(np.array(json.loads(out.read_text())["confusion_matrix"]), direct_matrix(run_dir / "best", data))


def test_other_shard_sizes_give_the_same_matrix(tmp_path, trained):
    run_dir, data = trained
    synth(tmp_path / "resharded", train=16, val=9, size="40x48", shard_size=2, workers=1, progress=False)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert evaluate(run_dir, "--data", data, "--out", a).returncode == 0
    assert evaluate(run_dir, "--data", tmp_path / "resharded", "--out", b, "--batch-size", "3").returncode == 0
    assert json.loads(a.read_text())["confusion_matrix"] == json.loads(b.read_text())["confusion_matrix"]


@pytest.mark.multiprocess
def test_one_and_two_processes_give_identical_matrices(tmp_path, trained):
    run_dir, data = trained
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert evaluate(run_dir, "--data", data, "--out", one, "--num-workers", "0").returncode == 0
    run_distributed(["-m", "unetseg.evaluate", str(run_dir), "--data", str(data), "--out", str(two),
                     "--num-workers", "2", "--batch-size", "2"], nproc=2, launcher="accelerate", timeout=300)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["num_processes"] == 2 and a["num_processes"] == 1
    assert a["confusion_matrix"] == b["confusion_matrix"] and a["num_samples"] == b["num_samples"] == 9


def test_class_mismatch_stops_with_the_names(tmp_path, trained):
    run_dir, _ = trained
    make_folders(tmp_path, {"val": 2})
    pack(tmp_path / "images", tmp_path / "masks", write_classes(tmp_path / "classes.json"), tmp_path / "other",
         workers=1, progress=False)
    result = evaluate(run_dir, "--data", tmp_path / "other", "--out", tmp_path / "r.json")
    assert result.returncode == 1
    assert "differ from the 10 classes" in result.stderr and "'red'" in result.stderr and "Fix:" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "r.json").exists()


def test_tta_modes(tmp_path, trained):
    run_dir, data = trained
    model, _, _ = load_model(run_dir)
    model.eval()
    x = torch.randn(2, 3, 40, 48)
    with torch.no_grad():
        flip = TTA(model, "flip")(x)
        expected = (model(x).softmax(1) + model(x.flip(-1)).flip(-1).softmax(1)) / 2
        assert torch.allclose(flip, expected, atol=1e-6)
        multi = TTA(model, "multiscale")(x)
    assert multi.shape == (2, 10, 40, 48) and torch.allclose(multi.sum(1), torch.ones(2, 40, 48), atol=1e-5)
    out = tmp_path / "r.json"
    result = evaluate(run_dir, "--data", data, "--out", out, "--tta", "multiscale")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(out.read_text())["tta"] == "multiscale"


def test_part_of_a_split_is_an_error_unless_allowed(tmp_path, trained):
    """Scoring fewer samples than the split has exits 1 naming what could not be read;
    --allow-missing N accepts it, and the report records how many were scored."""
    from conftest import corrupt

    run_dir, data = trained
    shutil.copytree(data, tmp_path / "data")
    key = corrupt(tmp_path / "data", "val-000000.tar", 1)  # one corrupt sample
    shard = tmp_path / "data" / "val-000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])  # and a truncated shard of 4
    out = tmp_path / "report.json"
    result = evaluate(run_dir, "--data", tmp_path / "data", "--out", out)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "of the 9 samples of split 'val' could not be scored" in result.stderr
    assert key in result.stderr and "val-000001.tar" in result.stderr and "--allow-missing" in result.stderr
    assert not out.exists()
    missing = int(result.stderr.split("error: ")[1].split()[1])
    assert 2 <= missing <= 5
    result = evaluate(run_dir, "--data", tmp_path / "data", "--out", out, "--allow-missing", missing)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["num_samples"] == 9 - missing and report["split_samples"] == 9 and report["missing_samples"] == missing
    assert len(report["unreadable"]) == 2


def test_plots_of_255_classes_stay_a_readable_size(tmp_path):
    """255 classes at 0.45 inch a class gave a 14130 x 14010 px confusion PNG; the figures
    are capped (no per-class names or per-cell numbers past the cap), 4 classes keep theirs."""
    from PIL import Image

    from unetseg.evaluate import write_plots
    from unetseg.metrics import ConfusionMatrix

    sizes = {}
    for n in (4, 255):
        cm = ConfusionMatrix(n, None, [f"class {i}" for i in range(n)])
        generator = torch.Generator().manual_seed(0)
        cm.update(torch.randint(0, n, (4, 8, 8), generator=generator), torch.randint(0, n, (4, 8, 8), generator=generator))
        (tmp_path / str(n)).mkdir()
        paths = write_plots(cm.compute(), tmp_path / str(n) / "report.json")
        sizes[n] = [Image.open(p).size for p in paths]
    assert sizes[4] == [(600, 480), (600, 480)]
    (cw, ch), (bw, bh) = sizes[255]
    assert cw <= 1600 and ch <= 1500 and bw <= 2000 and bh <= 500


def test_eval_resize_takes_every_size_form(tmp_path, trained, capsys):
    """--eval-resize is read by the one size type: 32x32, 32,32 and 32 are one size, and the
    report records it as [H, W]."""
    from conftest import run_main

    run_dir, data = trained
    reports = []
    for form in ("32x32", "32,32", "32"):
        out = tmp_path / form.replace(",", "_") / "report.json"
        code, _, err = run_main("evaluate", [run_dir, "--data", data, "--out", out, "--num-workers", "0",
                                             "--eval-resize", form], capsys)
        assert code == 0, err
        reports.append(json.loads(out.read_text()))
    assert [r["eval_resize"] for r in reports] == [[32, 32]] * 3
    assert reports[0]["confusion_matrix"] == reports[1]["confusion_matrix"] == reports[2]["confusion_matrix"]
