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
    assert most_common_size({"24x32": 5, "360x480": 9, "10x10": 1}) == [360, 480]
