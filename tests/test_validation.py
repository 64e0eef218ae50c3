"""Evaluation during training: every validation sample scored once, the best model kept,
and a stop request cutting the evaluation short with the evaluation still due."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from unetseg.batch import BatchHook
from unetseg.config import TrainConfig
from unetseg.models import build_model
from unetseg.models.unet import UNetConfig
from unetseg.runstate import TrainerState
from unetseg.runtime import StopFlag, make_accelerator
from unetseg.synth import synth
from unetseg.train_data import open_train_data
from unetseg.validation import Validation


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "syn"
    synth(folder, train=4, val=5, size="16x16", shard_size=2, workers=1, progress=False)
    return folder


def validation(tmp_path, data, stop: StopFlag, logged: list) -> Validation:
    config = TrainConfig.from_dict({"data": {"data": str(data), "num_workers": 0, "batch_size": 2},
                                    "run": {"tracker": "none", "log_images": 0}})
    accelerator = make_accelerator("no")
    train_data = open_train_data(config, accelerator)
    options = UNetConfig(width=4, depth=1, num_classes=train_data.classes.num_classes)
    net = build_model(options)
    run = SimpleNamespace(config=config, accelerator=accelerator, data=train_data, net=net, eval_model=net,
                          hook=BatchHook(accelerator.device), state=TrainerState(step=3), run_dir=tmp_path, main=True,
                          saved_config={**config.to_dict(), "model": options.to_dict()})
    reporter = SimpleNamespace(log_eval=lambda result, examples, bad: logged.append(result))
    return Validation(run, stop, reporter)


def test_scores_every_sample_once_and_keeps_the_best(tmp_path, data):
    logged: list = []
    validate = validation(tmp_path, data, StopFlag(), logged)
    metrics = validate()
    assert metrics is not None and metrics["num_samples"] == 5
    assert len(logged) == 1 and logged[0].num_samples == 5
    state = validate.run.state
    assert not state.pending_eval and state.best_step == 3 and state.best_miou == metrics["mIoU"]
    assert (tmp_path / "best" / "model.safetensors").is_file()


def test_a_stop_cuts_it_short_and_leaves_it_due(tmp_path, data):
    stop = StopFlag()
    stop.requested = True
    logged: list = []
    validate = validation(tmp_path, data, stop, logged)
    assert validate() is None
    assert validate.run.state.pending_eval and validate.run.state.best_miou is None
    assert logged == [] and not (tmp_path / "best").exists()


def test_the_compiled_eval_model_sees_one_shape_the_split_needs(data):
    from unetseg.scoring import FixedShape
    from unetseg.validation import eval_model

    net = build_model(UNetConfig(width=4, depth=2, num_classes=10))
    cpu = make_accelerator("no").device
    for compile_, resize, expected in (("off", None, None), ("on", None, (2, 16, 16)), ("on", [20, 30], (2, 20, 32))):
        config = TrainConfig.from_dict({"data": {"data": str(data), "num_workers": 0, "batch_size": 2,
                                                 "eval_resize": resize}, "run": {"compile": compile_}})
        model = eval_model(config, cpu, net, open_train_data(config, make_accelerator("no")))
        if expected is None:
            assert model is net
        else:  # the split's 16x16 images, or eval_resize rounded up to a multiple of 2**depth
            assert isinstance(model, FixedShape) and (model.batch, *model.shape(1, 1)) == expected
