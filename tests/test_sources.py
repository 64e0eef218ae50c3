"""Sources: shard folders, patterns, http and pipe: shards, and the split each belongs to."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import all_keys, eval_keys, make, train_stream
from multiproc import free_port
# Shared with test_stream.py, whose streams these tests read the sources through; they
# belong in conftest.py.
from unetseg.errors import UnetsegError
from unetseg.sources import open_source, sibling_split


def test_missing_split_and_folder_errors(tmp_path):
    folder = make(tmp_path, "s", train=1, val=1)
    with pytest.raises(UnetsegError, match="no split 'test'"):
        open_source(folder, "test")
    with pytest.raises(UnetsegError, match="dataset.json: no such file"):
        open_source(tmp_path / "nowhere", "val")


@pytest.fixture
def http_server(tmp_path):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                               "--directory", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(base, timeout=1)
            break
        except OSError:
            time.sleep(0.05)
    yield base
    server.terminate()
    server.wait(timeout=10)


def test_shards_stream_over_http(tmp_path, http_server):
    folder = make(tmp_path, "s", train=8, val=7, shard_size=3)
    expected = sorted(all_keys(folder, "val"))
    source = open_source(f"{http_server}/s", "val")
    assert source.urls[0].startswith("http://127.0.0.1") and source.counts == [3, 3, 1]
    assert sorted(eval_keys(source, workers=2)) == expected
    pattern = open_source(f"{http_server}/s/val-{{000000..000002}}.tar", "val")
    assert sorted(eval_keys(pattern)) == expected
    local = [next(it)["keys"] for it in [train_stream(open_source(folder, "train"))] for _ in range(4)]
    remote = [next(it)["keys"] for it in [train_stream(open_source(f"{http_server}/s", "train"))] for _ in range(4)]
    assert local == remote


def test_shards_stream_through_a_pipe_command(tmp_path):
    folder = make(tmp_path, "s", train=2, val=5, shard_size=2)
    source = open_source(f"pipe:cat {folder}/val-{{000000..000002}}.tar", "val", dataset_json=folder / "dataset.json")
    assert source.counts == [2, 2, 1]
    assert sorted(eval_keys(source, workers=2)) == sorted(all_keys(folder, "val"))
    with pytest.raises(UnetsegError, match="--dataset-json"):
        open_source(f"pipe:cat {folder}/val-000000.tar", "val")


def test_a_pattern_is_taken_for_the_split_dataset_json_lists_it_under(tmp_path):
    folder = make(tmp_path, "s", train=9, val=5, shard_size=3)
    train = open_source(f"{folder}/train-{{000000..000002}}.tar", "train")
    assert train.counts == [3, 3, 3] and train.folder == str(folder)
    val = sibling_split(train, "val")  # the validation shards beside the training pattern
    assert sorted(eval_keys(val)) == sorted(all_keys(folder, "val"))
    assert not set(val.urls) & set(train.urls)
    with pytest.raises(UnetsegError, match=r"train-000000.tar \(train\).*another split than 'val'"):
        open_source(f"{folder}/train-{{000000..000002}}.tar", "val")
    with pytest.raises(UnetsegError, match="does not list"):
        open_source(f"{folder}/train-{{000000..000009}}.tar", "train")
    piped = open_source(f"pipe:cat {folder}/train-{{000000..000002}}.tar", "train", dataset_json=folder / "dataset.json")
    assert piped.counts == [3, 3, 3]
    with pytest.raises(UnetsegError, match="--val-data"):
        sibling_split(piped, "val")
