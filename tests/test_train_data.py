"""What training reads: the validation split is found beside the training shards, never
overlaps them, and has the training data's classes; the augmentation follows the config."""

from __future__ import annotations

import pytest

from unetseg.config import TrainConfig
from unetseg.errors import UnetsegError
from unetseg.synth import synth
from unetseg.train_data import most_common_size, open_sources


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "syn"
    synth(folder, train=8, val=4, size="24x32", shard_size=4, workers=1, progress=False)
    return folder


def config(**data) -> TrainConfig:
    return TrainConfig.from_dict({"data": data})


def test_validation_comes_from_the_val_split_beside_the_training_shards(data):
    train, val = open_sources(config(), str(data))
    assert train.num_samples == 8 and val.num_samples == 4
    assert not set(train.urls) & set(val.urls)


def test_validating_on_training_shards_is_refused(data):
    with pytest.raises(UnetsegError, match="read for training and for validation.*--val-data"):
        open_sources(config(val_split="train"), str(data))


def test_validation_data_with_other_classes_is_refused(data, tmp_path):
    other = tmp_path / "other"
    synth(other, train=4, val=4, size="24x32", shard_size=4, workers=1, progress=False)
    dataset = other / "dataset.json"
    dataset.write_text(dataset.read_text().replace('"background"', '"sky"'))
    with pytest.raises(UnetsegError, match="differ from the training data's"):
        open_sources(config(val_data=str(other)), str(data))


def test_the_default_crop_is_the_most_common_image_size():
    assert most_common_size({(24, 32): 5, (360, 480): 9, (10, 10): 1}) == [360, 480]


def test_several_training_splits_are_read_as_one_and_may_include_validation(data, capsys):
    """--train-split train,val: the final model's run trains on both; validation still
    runs on val, with a note that it is no held-out measure."""
    train, val = open_sources(config(train_split="train,val"), str(data))
    alone_train, alone_val = open_sources(config(), str(data))
    assert train.urls == alone_train.urls + alone_val.urls and train.num_samples == 12
    assert train.split == "train+val" and train.splits == ["train", "val"]
    per_split = [alone_train.info.split(s).pixel_counts for s in ("train", "val")]
    assert train.pixel_counts() == [a + b for a, b in zip(*per_split)]
    assert train.image_sizes() == {(24, 32): 12}
    assert val.urls == alone_val.urls
    assert "not a held-out measure" in capsys.readouterr().out


@pytest.mark.parametrize("splits, data_kind, message", [
    ("train,train", "folder", "named twice"),
    ("train,val", "pattern", "pattern names the shards of one split"),
    ("train,test", "folder", "no split 'test'"),
])
def test_several_splits_name_the_problem(data, splits, data_kind, message):
    where = str(data) if data_kind == "folder" else str(data / "train-{000000..000001}.tar")
    with pytest.raises(UnetsegError, match=message):
        open_sources(config(train_split=splits), where)
