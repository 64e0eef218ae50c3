"""unetseg.distributed: rank, world size and reductions in a single process, with and without a process group.

Real multi-process groups (torchrun and accelerate launch, 2 and 3 gloo ranks) are exercised by
tests/test_metrics.py through tests/scripts/metrics_worker.py (get_rank, get_world_size,
all_reduce_sum); all_gather_objects runs across 2 ranks only inside the 2-process evaluate and
train runs of test_evaluate.py and test_train.py (merging bad-sample sets, there empty).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from unetseg import distributed


def test_distributed_helpers_without_process_group():
    tensor = torch.tensor([1, 2, 3])
    assert distributed.all_reduce_sum(tensor) is tensor
    assert tensor.tolist() == [1, 2, 3]
    assert (distributed.get_rank(), distributed.get_world_size(), distributed.is_dist()) == (0, 1, False)


def test_gather_and_end_without_process_group():
    obj = {"found": ["a.tar#k1"]}
    gathered = distributed.all_gather_objects(obj)
    assert gathered == [obj] and gathered[0] is obj
    distributed.end_process_group()  # nothing to end: neither raises nor creates a group
    distributed.end_process_group()
    assert not distributed.is_dist()


def test_one_process_gloo_group_then_end_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert distributed.is_dist() and (distributed.get_rank(), distributed.get_world_size()) == (0, 1)
        assert distributed._backend_for("cpu") == "gloo"
        tensor = torch.tensor([1.5, -2.0])
        assert distributed.all_reduce_sum(tensor) is tensor and tensor.tolist() == [1.5, -2.0]
        assert distributed.all_gather_objects({"rank": 0, "bad": ["x"]}) == [{"rank": 0, "bad": ["x"]}]
    finally:
        distributed.end_process_group()
    assert not dist.is_initialized() and not distributed.is_dist()
    assert (distributed.get_rank(), distributed.get_world_size()) == (0, 1)


@pytest.mark.parametrize(
    ("backend", "device", "expected"),
    [("gloo", "cpu", "gloo"), ("nccl", "cpu", "nccl"), ("cpu:gloo,cuda:nccl", "cpu", "gloo"),
     ("cpu:gloo,cuda:nccl", "cuda", "nccl"), ("cuda:nccl", "cpu", None)],
)  # fmt: skip
def test_backend_for_device(monkeypatch, backend, device, expected):
    # Decides whether all_reduce_sum stages a CPU tensor on the GPU for NCCL.
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    assert distributed._backend_for(device) == expected
