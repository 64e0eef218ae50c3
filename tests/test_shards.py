"""shards verify / info, and the command line around them."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile

import numpy as np

from conftest import REPO, make_folders, write_classes
from unetseg.shards import verify_shards
from unetseg.synth import synth


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "unetseg", *map(str, args)], capture_output=True, text=True, cwd=cwd or REPO)


def small(tmp_path):
    synth(tmp_path / "s", train=6, val=2, size="32x32", shard_size=3, workers=1, progress=False)
    return tmp_path / "s"


def test_verify_passes_on_good_shards(tmp_path):
    assert verify_shards(small(tmp_path), progress=False) == []


def test_verify_reports_a_truncated_shard(tmp_path):
    folder = small(tmp_path)
    shard = folder / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:2500])
    problems = verify_shards(folder, progress=False)
    assert any("train-000001.tar" in p and "unreadable" in p for p in problems), problems
    assert any("holds" in p and "dataset.json says 3" in p for p in problems), problems
    result = cli("shards", "verify", folder)
    assert result.returncode == 1
    assert "train-000001.tar" in result.stderr and "Traceback" not in result.stderr


def test_verify_reports_bad_labels_missing_and_extra_shards(tmp_path):
    folder = small(tmp_path)
    # Rewrite one shard with a mask that holds an id that is no class.
    members = []
    with tarfile.open(folder / "train-000000.tar") as tar:
        for m in tar.getmembers():
            members.append((m, tar.extractfile(m).read()))
    from unetseg.imageio import encode_png

    with tarfile.open(folder / "train-000000.tar", "w") as tar:
        for i, (m, data) in enumerate(members):
            if m.name.endswith(".mask.png") and i < 3:
                data = encode_png(np.full((32, 32), 42, np.uint8))
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    (folder / "val-000000.tar").rename(folder / "val-000009.tar")
    problems = verify_shards(folder, progress=False)
    text = "\n".join(problems)
    assert "train-000000.tar sample" in text and "label ids [42]" in text
    assert "val-000000.tar: shard listed in dataset.json is missing" in text
    assert "val-000009.tar: shard not listed" in text


def test_cli_synth_info_verify(tmp_path):
    out = tmp_path / "syn"
    result = cli("synth", "--out", out, "--train", 4, "--val", 2, "--size", "32x32")
    assert result.returncode == 0, result.stderr
    assert "train: 4 samples" in result.stdout
    info = cli("shards", "info", out)
    assert info.returncode == 0, info.stderr
    for text in ("train", "val", "ring", "crescent", "ignore_index=255"):
        assert text in info.stdout
    verify = cli("shards", "verify", out)
    assert verify.returncode == 0 and "every sample decodes" in verify.stdout


def test_cli_pack_reports_problems_without_traceback(tmp_path):
    make_folders(tmp_path, {"train": 2})
    (tmp_path / "masks" / "train" / "train_000.png").unlink()
    classes = write_classes(tmp_path / "classes.json")
    result = cli("pack", "--images", tmp_path / "images", "--masks", tmp_path / "masks", "--classes", classes,
                 "--out", tmp_path / "out")
    assert result.returncode == 1
    assert "train_000.png" in result.stderr and "image has no mask" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
    ok = cli("pack", "--images", tmp_path / "images", "--masks", tmp_path / "masks", "--classes", classes,
             "--out", tmp_path / "out", "--skip-invalid")
    assert ok.returncode == 0, ok.stderr
    assert "skipped 1 invalid pair" in ok.stderr and "train: 1 samples" in ok.stdout


def test_cli_missing_dataset_json(tmp_path):
    result = cli("shards", "info", tmp_path)
    assert result.returncode == 1 and "dataset.json: no such file" in result.stderr and "Fix:" in result.stderr
