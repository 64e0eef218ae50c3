"""unetseg.errors: how a Problem and a list of them (InputProblems) read, and that both are UnetsegErrors."""

from __future__ import annotations

import dataclasses

import pytest

from unetseg.errors import InputProblems, Problem, UnetsegError


def test_problem_reads_path_what_fix():
    p = Problem("data/masks/a.png", "mask is 3x4 but its image is 4x3", "resize the mask")
    assert str(p) == "data/masks/a.png: mask is 3x4 but its image is 4x3. Fix: resize the mask"
    assert p.to_dict() == {"path": "data/masks/a.png", "what": "mask is 3x4 but its image is 4x3", "fix": "resize the mask"}
    assert Problem(**p.to_dict()) == p
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.path = "elsewhere"


def test_input_problems_lists_every_problem_under_a_counted_header():
    problems = (Problem("a.png", "no mask", "add one"), Problem("b.png", "no image", "remove it"))
    err = InputProblems(iter(problems), header="pack found problems")
    assert err.problems == list(problems)
    assert str(err) == "pack found problems (2):\n  - a.png: no mask. Fix: add one\n  - b.png: no image. Fix: remove it"
    assert str(InputProblems([problems[0]])).startswith("the input has problems (1):\n  - a.png")


def test_input_problems_is_caught_as_a_unetseg_error():
    with pytest.raises(UnetsegError) as e:
        raise InputProblems([Problem("x", "y", "z")])
    assert isinstance(e.value, InputProblems) and e.value.problems[0].fix == "z"
