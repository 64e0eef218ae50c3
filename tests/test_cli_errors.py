"""Bad input to `train` and `evaluate`, table-driven: each case exits non-zero with a
message naming the file or key and the fix (or completes as documented), never with a
traceback. The commands run in this process (`conftest.run_main`), so an unexpected
exception fails the test with its traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import corrupt, run_main
from unetseg.synth import synth

TINY = ["--batch-size", "4", "--model-width", "4", "--model-depth", "2", "--num-workers", "0", "--tracker", "none",
        "--crop-size", "32", "--max-steps", "2", "--log-every", "1"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    synth(root / "good", train=8, val=8, size="32x32", shard_size=4, workers=1, progress=False)
    result = subprocess.run([sys.executable, "-m", "unetseg.train", "--data", str(root / "good"),
                             "--output-dir", str(root / "model"), *TINY], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def variant(base: Path, tmp_path: Path, change: str) -> Path:
    """A copy of the good shards with one thing wrong."""
    folder = tmp_path / change
    shutil.copytree(base / "good", folder)
    info = json.loads((folder / "dataset.json").read_text())
    if change == "empty_val":
        for name in info["splits"]["val"]["shards"]:
            (folder / name).unlink()
        info["splits"]["val"].update(num_samples=0, shards=[], shard_num_samples=[])
    elif change == "truncated":
        for split in ("train", "val"):
            shard = folder / f"{split}-000001.tar"
            shard.write_bytes(shard.read_bytes()[:2000])  # about 3 of its 4 samples lost
    elif change == "corrupt":
        corrupt(folder, "train-000000.tar", 1)
        corrupt(folder, "val-000000.tar", 0)
    (folder / "dataset.json").write_text(json.dumps(info))
    return folder


# (id, command, data variant, extra arguments, expected exit code, texts the output must hold)
CASES = [
    ("train-missing-data", "train", None, ["--data", "{tmp}/nowhere"], 1, ["nowhere/dataset.json: no such file", "Fix:"]),
    ("train-empty-val-split", "train", "empty_val", [], 1, ["split 'val'", "has no samples to evaluate on", "--val-data"]),
    ("train-truncated-shard", "train", "truncated", [], 0, ["bad training samples skipped so far", "final val mIoU",
                                                             "train-000001.tar"]),
    ("train-truncated-shard-no-budget", "train", "truncated", ["--max-bad-samples", "0"], 1,
     ["more than --max-bad-samples 0", "-000001.tar", "shards verify"]),
    ("train-corrupt-sample", "train", "corrupt", [], 0, ["1 bad training samples skipped so far", "final val mIoU",
                                                         "val mIoU over 7 of the split's 8 samples"]),
    ("train-wrong-class-count", "train", "good", ["--class-weights", "1,2,3"], 1, ["3 weights", "10 classes", "Fix:"]),
    ("train-bad-yaml-values", "train", "good", ["--config", "{tmp}/bad.yaml"], 1,
     ["bad.yaml", "data.scale_range", "optim.lr", "model.norm", "'batchnorm'", "'batch', 'group' or 'none'", "Fix:"]),
    ("train-unknown-keys", "train", "good", ["--config", "{tmp}/unknown.yaml"], 1,
     ["unknown.yaml", "optim.learning_rate", "unknown key", "Known optim keys"]),
    ("train-bad-flag", "train", "good", ["--max-steps", "many"], 1, ["run.max_steps (--max-steps) = 'many'", "Fix:"]),
    ("evaluate-missing-data", "evaluate", None, ["{model}", "--data", "{tmp}/nowhere"], 1, ["nowhere/dataset.json: no such file"]),
    ("evaluate-missing-model", "evaluate", "good", ["{tmp}/no-model"], 1, ["no-model: no model.safetensors", "Fix:"]),
    ("evaluate-empty-split", "evaluate", "empty_val", ["{model}"], 1, ["split 'val'", "has no samples to evaluate"]),
    ("evaluate-truncated-shard", "evaluate", "truncated", ["{model}"], 1,
     ["could not be scored", "val-000001.tar", "--allow-missing"]),
    ("evaluate-corrupt-sample", "evaluate", "corrupt", ["{model}"], 1, ["1 of the 8 samples", "does not decode"]),
    ("evaluate-wrong-class-count", "evaluate", "other_classes", ["{model}"], 1, ["differ from the 10 classes", "Fix:"]),
    ("evaluate-bad-batch-size", "evaluate", "good", ["{model}", "--batch-size", "0"], 1, ["--batch-size 0", "Fix:"]),
    ("evaluate-bad-eval-resize", "evaluate", "good", ["{model}", "--eval-resize", "big"], 1, ["--eval-resize big", "Fix:"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, base, tmp_path, capsys):
    name, command, change, extra, code, texts = case
    (tmp_path / "bad.yaml").write_text("data:\n  scale_range: 2,1\noptim:\n  lr: -1\nmodel:\n  norm: batchnorm\n")
    (tmp_path / "unknown.yaml").write_text("optim:\n  learning_rate: 0.1\n")
    if change == "other_classes":
        from conftest import make_folders, write_classes
        from unetseg.pack import pack

        make_folders(tmp_path, {"val": 2})
        data = tmp_path / "other"
        pack(tmp_path / "images", tmp_path / "masks", write_classes(tmp_path / "classes.json"), data, workers=1,
             progress=False)
    elif change is not None:
        data = base / "good" if change == "good" else variant(base, tmp_path, change)
    extra = [a.format(tmp=tmp_path, model=base / "model") for a in extra]
    if command == "train":
        argv = [*(["--data", data] if change else []), "--output-dir", tmp_path / "run", *TINY, *extra]
    else:
        argv = [*extra[:1], *(["--data", data] if change else []), *extra[1:], "--out", tmp_path / "report.json",
                "--num-workers", "0"]
    got, out, err = run_main(command, argv, capsys)
    assert got == code, f"{name}: exit {got}\n{out[-3000:]}\n{err[-3000:]}"
    for text in texts:
        assert text in out + err, f"{name}: {text!r} not in\n{out[-3000:]}\n{err[-3000:]}"
    assert "Traceback" not in out + err
    if code and command == "evaluate":
        assert not (tmp_path / "report.json").exists()
