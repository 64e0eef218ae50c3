"""One image-size type: every H,W of a config, a flag and a Python argument is read the
same way, in every form (256, 256x320, 256,320), and a bad one names its flag and the fix.
And `unetseg evaluate`'s options, declared like train's, are checked before any model loads."""

from __future__ import annotations

import pytest

from conftest import run_main
from unetseg.augment import TrainTransform, TrainTransformConfig
from unetseg.config import TrainConfig
from unetseg.errors import UnetsegError
from unetseg.evaluate import parse_args
from unetseg.flags import parse_args as train_args
from unetseg.options import size_pair

FORMS = [("256", (256, 256)), ("256x320", (256, 320)), ("256,320", (256, 320)), ("256X320", (256, 320)),
         (" 256 , 320 ", (256, 320)), (256, (256, 256)), ((256, 320), (256, 320)), ([256], (256, 256))]
BAD = [("big", "Input should be a valid integer"), ("1,2,3", "need H,W"), ("0x5", "need H,W"),
       ("256x", "item 2"), ("256,abc", "item 2"), (True, "true/false"), (256.5, "fractional")]


@pytest.mark.parametrize("value, pair", FORMS)
def test_every_form_reads_the_same_everywhere(value, pair):
    assert size_pair(value, "--x") == pair
    assert TrainConfig.from_dict({"data": {"crop_size": value}}).data.crop_size == list(pair)
    assert TrainTransform(TrainTransformConfig(crop_size=value), 255).crop == pair
    if isinstance(value, str):  # a flag is text
        assert train_args(["--eval-resize", value]).data.eval_resize == list(pair)
        assert parse_args(["run", "--data", "shards", "--eval-resize", value]).eval_resize == list(pair)


def test_none_means_unset():
    assert size_pair(None, "--x") is None
    assert train_args(["--crop-size", "none"]).data.crop_size is None
    assert parse_args(["run", "--data", "shards", "--eval-resize", "none"]).eval_resize is None


@pytest.mark.parametrize("value, why", BAD)
def test_bad_sizes_name_the_flag_the_value_and_the_fix(value, why):
    with pytest.raises(UnetsegError, match="Fix:") as e:
        size_pair(value, "--crop-size")
    assert f"--crop-size {value!r}: " in str(e.value) and why in str(e.value)
    if isinstance(value, str):
        with pytest.raises(UnetsegError) as e:
            train_args(["--crop-size", value])
        assert f"data.crop_size (--crop-size) = {value!r}: " in str(e.value) and "Fix:" in str(e.value)
        with pytest.raises(UnetsegError) as e:
            parse_args(["run", "--data", "shards", "--eval-resize", value])
        assert "--eval-resize " in str(e.value) and "`unetseg evaluate --help`" in str(e.value)


def test_bounds_of_a_caller_name_the_sides():
    with pytest.raises(UnetsegError, match=r"--size '8x8': sides must be 16..4096 pixels\. Fix: use e\.g\. 128x128"):
        size_pair("8x8", "--size", smallest=16, largest=4096)
    assert size_pair("16x4096", "--size", smallest=16, largest=4096) == (16, 4096)


def test_evaluate_refuses_bad_values_before_any_model_loads(tmp_path, capsys, monkeypatch):
    """Every bad value at once, each as typed with its flag, and nothing opened: the model
    folder does not even exist."""
    import unetseg.checkpoint

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was looked for before the options were checked")

    monkeypatch.setattr(unetseg.checkpoint, "model_folder", no_loading)
    monkeypatch.setattr(unetseg.checkpoint, "load_model", no_loading)
    argv = [tmp_path / "no-model", "--data", tmp_path / "nowhere", "--out", tmp_path / "report.json",
            "--batch-size", "0", "--num-workers", "-1", "--eval-resize", "big", "--allow-missing", "some",
            "--tta", "rotate", "--compile", "yes"]
    code, out, err = run_main("evaluate", argv, capsys)
    assert code == 1 and "Traceback" not in out + err
    for line in ("--batch-size 0: ", "--num-workers -1: ", "--eval-resize big: ", "--allow-missing some: ",
                 "--tta rotate: ", "--compile yes: ", "(6 problems)", "Fix: give the flags named above"):
        assert line in err, f"{line!r} not in {err}"
    assert "no-model" not in err and not (tmp_path / "report.json").exists()


def test_evaluate_keeps_argparse_for_what_argparse_knows(tmp_path, capsys):
    """A missing --data or an unknown flag is argparse's usage error (exit 2), as before."""
    assert run_main("evaluate", [tmp_path / "run"], capsys)[0] == 2
    assert run_main("evaluate", [tmp_path / "run", "--data", "d", "--bogus", "1"], capsys)[0] == 2
