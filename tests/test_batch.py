"""The device-side batch hook: what reaches the model is what the loader gave, on the
device, after the hook's steps, in the memory format asked for."""

from __future__ import annotations

import torch

from unetseg.batch import BatchHook


def batch() -> dict:
    return {"image": torch.rand(2, 3, 8, 12), "mask": torch.randint(0, 4, (2, 8, 12)), "sizes": [(8, 12), (6, 10)],
            "keys": ["a", "b"]}


def test_moves_image_and_mask_and_passes_the_rest_through():
    given = batch()
    out = BatchHook("cpu")(given)
    assert torch.equal(out["image"], given["image"]) and torch.equal(out["mask"], given["mask"])
    assert out["sizes"] == given["sizes"] and out["keys"] == given["keys"]
    assert out is not given  # the loader's dict is left as it was


def test_steps_run_in_order_on_the_device_batch():
    calls = []

    def double(b):
        calls.append("double")
        return {**b, "image": b["image"] * 2}

    def shift(b):
        calls.append("shift")
        return {**b, "image": b["image"] + 1}

    given = batch()
    out = BatchHook("cpu", steps=[double, shift])(given)
    assert calls == ["double", "shift"]
    torch.testing.assert_close(out["image"], given["image"] * 2 + 1)


def test_channels_last_is_applied_after_the_steps():
    out = BatchHook("cpu", channels_last=True, steps=[lambda b: {**b, "image": b["image"].contiguous()}])(batch())
    assert out["image"].is_contiguous(memory_format=torch.channels_last)
    assert BatchHook("cpu")(batch())["image"].is_contiguous()
