"""unetseg report: the page's content checked against direct computations, the missing
pieces of a run still going, and (with Debian's chromium and playwright) the page as a
browser shows it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import direct_predictions, train_tiny
from unetseg.dataset import DatasetInfo
from unetseg.errors import UnetsegError
from unetseg.report import image_miou, report
from unetseg.synth import synth

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CAPTION = re.compile(r"<code>([^<]+)</code>: image mIoU <b>([0-9.]+)</b>")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny finished run with one recorded `unetseg evaluate`, and its shards."""
    root = tmp_path_factory.mktemp("report")
    synth(root / "syn", train=12, val=9, size="40x48", shard_size=4, workers=1, progress=False)
    train_tiny(root / "syn", root / "run", "--max-steps", 6, "--eval-every", 3)
    evaluate = [sys.executable, "-m", "unetseg", "evaluate", str(root / "run"), "--data", str(root / "syn"),
                "--tta", "flip", "--out", str(root / "eval" / "report.json")]
    result = subprocess.run(evaluate, capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run", root / "syn"


def direct_image_mious(model_dir: Path, data: Path, split: str = "val") -> dict[str, float]:
    """Each image's mIoU over the classes in its truth or prediction, computed here."""
    scores = {}
    for key, target, pred, n, ignore in direct_predictions(model_dir, data, split):
        keep = (target != ignore) & (target < n)
        ious = []
        for c in range(n):
            union = np.sum(((target == c) | (pred == c)) & keep)
            if union:
                ious.append(np.sum((target == c) & (pred == c) & keep) / union)
        scores[key] = float(np.mean(ious))
    return scores


def test_image_miou_counts_the_classes_present():
    target = torch.tensor([[0, 0, 1, 9]])  # 9: ignored (outside the 3 classes)
    pred = torch.tensor([[0, 1, 1, 2]])
    # class 0: 1/2, class 1: 1/2; class 2 is predicted only on an ignored pixel: not present
    assert image_miou(pred, target, 3) == pytest.approx(0.5)
    assert image_miou(pred, torch.full_like(target, 9), 3) is None


def test_the_page_shows_the_worst_and_best_images_the_tables_and_the_evaluation(tmp_path, trained):
    run_dir, data = trained
    out = report(run_dir, data=str(data), out=tmp_path / "r" / "page.html", gallery=3)
    page = out.read_text()
    direct = direct_image_mious(run_dir / "best", data)
    shown = [(key, float(value)) for key, value in CAPTION.findall(page)]
    assert len(shown) == 6  # 3 worst, then 3 best
    for key, value in shown:
        assert value == pytest.approx(100 * direct[key], abs=0.006), key
    ranked = sorted(direct.values())
    assert [v for _, v in shown[:3]] == pytest.approx([100 * v for v in ranked[:3]], abs=0.006)
    assert [v for _, v in shown[3:]] == pytest.approx([100 * v for v in ranked[::-1][:3]], abs=0.006)
    # the per-class table: every class once, weakest first
    info = DatasetInfo.load(data)
    section = page.split("<h2>Per class (weakest first)</h2>")[1].split("</table>")[0]
    rows = re.findall(r"<tr><td>([^<]+)</td><td class=\"num\">([0-9.]+|n/a)</td>", section)
    assert sorted(name for name, _ in rows) == sorted(info.classes.names)
    ious = [float(v) for _, v in rows if v != "n/a"]
    assert ious == sorted(ious)
    # sessions, the evaluation recorded by `unetseg evaluate`, curves beside the page
    assert "python -m unetseg.train --data" in page and "no end recorded" not in page
    evaluation = json.loads((run_dir / "evaluations.jsonl").read_text().splitlines()[0])
    assert evaluation["tta"] == "flip" and evaluation["model"] == "best"
    assert "<td>flip</td>" in page and f"{100 * evaluation['mIoU']:.2f}" in page
    assert (out.parent / "page_curves.png").read_bytes()[:4] == b"\x89PNG"
    # self-contained: every image embedded, nothing fetched
    assert re.findall(r'src="([^"]+)"', page) and all(src.startswith("data:image/") for src in re.findall(r'src="([^"]+)"', page))
    assert "http://" not in page and "https://" not in page
    assert "Missing from this report" not in page


def test_a_run_still_going_names_what_is_missing(tmp_path, trained):
    run_dir, _ = trained
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.yaml", "dataset.json"):
        shutil.copy(run_dir / name, partial / name)
    sessions = (run_dir / "sessions.jsonl").read_text().splitlines()
    (partial / "sessions.jsonl").write_text(sessions[0] + "\n")  # started, not ended
    page = report(partial).read_text()
    assert "no end recorded" in page and "No saved model yet" in page and "no training curves" in page
    assert "No evaluation yet" in page

    # logged steps and an evaluation, still no model: the table comes from metrics.jsonl
    (partial / "metrics.jsonl").write_text((run_dir / "metrics.jsonl").read_text())
    page = report(partial).read_text()
    assert "The evaluation during training at step 6" in page and "Worst" not in page
    assert "no training curves" not in page


def test_a_resumed_run_shows_one_row_per_session(tmp_path, trained):
    run_dir, _ = trained
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    start, end = [json.loads(line) for line in (run_dir / "sessions.jsonl").read_text().splitlines()]
    sessions = [{**start, "command": "first"}, {**end, "step": 4, "stopped": True},
                {**start, "command": "second --resume auto", "step": 4, "resumed_from": "checkpoints/step-00000004"}, end]
    (resumed / "sessions.jsonl").write_text("".join(json.dumps(s) + "\n" for s in sessions))
    page = report(resumed, gallery=0).read_text()
    section = page.split("<h2>Run</h2>")[1].split("</table>")[0]
    rows = section.split("<tr>")[2:]
    assert len(rows) == 2
    assert "first" in rows[0] and "stopped by a signal" in rows[0] and "<td>4</td>" in rows[0]
    assert "second --resume auto" in rows[1] and "<td>6</td>" in rows[1]
    assert "Worst" not in page  # --gallery 0


def test_a_model_whose_data_is_gone_is_reported_without_a_gallery(tmp_path, trained):
    run_dir, _ = trained
    page = report(run_dir, data=str(tmp_path / "nowhere"), out=tmp_path / "page.html").read_text()
    assert "Could not score" in page and "nowhere" in page and "Worst" not in page
    assert "Per class (weakest first)" in page  # from the last evaluation during training


def test_not_a_run_dir_is_a_clear_error(tmp_path):
    with pytest.raises(UnetsegError, match="not a run dir"):
        report(tmp_path)


BROWSER = shutil.which("chromium")


@pytest.mark.browser
@pytest.mark.skipif(BROWSER is None, reason="Debian's chromium is not installed (make test-browser installs it)")
def test_a_real_browser_shows_the_page_without_errors(tmp_path, trained):
    sync_playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed "
                                          "(make test-browser installs it)").sync_playwright
    run_dir, data = trained
    out = report(run_dir, data=str(data), out=tmp_path / "page.html")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=BROWSER, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        problems = []
        page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("request", lambda r: problems.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
        page.goto(out.as_uri())
        sizes = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
        shot = tmp_path / "page.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert problems == []
    assert len(sizes) >= 5 and all(done and w > 0 and h > 0 for done, w, h in sizes)
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 20000
