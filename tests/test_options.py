"""The base every config section shares: values from Python code must have their type
while text from files and flags is coerced, and every problem is one readable error."""

from __future__ import annotations

import pytest

from unetseg.config import DataConfig, TrainConfig
from unetseg.errors import UnetsegError
from unetseg.models.unet import UNetConfig
from unetseg.options import ConfigError, allowed


def test_python_values_must_have_their_type_but_text_is_coerced():
    with pytest.raises(ConfigError, match=r"(?s)in Python code.*model\.dropout = '0\.1'"):
        UNetConfig(dropout="0.1")
    assert TrainConfig.from_dict({"model": {"dropout": "0.1"}}, source="c.yaml").model.dropout == 0.1


def test_a_section_validated_alone_names_its_keys_under_the_section():
    with pytest.raises(ConfigError) as e:
        DataConfig(batch_size=0, crop_size=[1, 2, 3])
    assert e.value.problems[0].startswith("data.batch_size = 0:") and len(e.value.problems) == 2
    assert isinstance(e.value, UnetsegError) and str(e.value).endswith("Fix: use the values allowed above")


def test_what_a_field_accepts_comes_from_its_type_bounds_or_explanation():
    fields = DataConfig.model_fields
    assert allowed("batch_size", fields["batch_size"]) == "a whole number >= 1"
    assert allowed("crop_size", fields["crop_size"]).startswith("H,W, HxW or one size for both")
    assert allowed("eval_batch_size", fields["eval_batch_size"]).endswith(", or none")
