"""Runtime set-up shared by train and evaluate: the stop flag, decisions taken on the main
process, BatchNorm statistics shared across ranks, and the SyncBatchNorm check. (Several
processes are exercised end to end in test_train.py and test_evaluate.py.)"""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace

import pytest
import torch

from unetseg.errors import UnetsegError
from unetseg.runtime import StopFlag, check_sync_bn, has_accelerator, make_accelerator, on_main, sync_buffers


def test_stop_flag_records_the_signal_and_restores_nothing_else():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    stop = StopFlag()
    try:
        stop.install()
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signal == "SIGTERM"
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_on_main_hands_back_the_value_or_the_error():
    assert on_main(lambda: {"run_dir": "runs/x"}) == {"run_dir": "runs/x"}

    def refuse():
        raise UnetsegError("no. Fix: yes")

    with pytest.raises(UnetsegError, match="no. Fix: yes"):
        on_main(refuse)


def test_the_accelerator_runs_where_torch_says():
    accelerator = make_accelerator("no")
    assert (accelerator.device.type == "cpu") == (not has_accelerator())
    assert accelerator.num_processes == 1


def test_sync_bn_is_refused_for_several_cpu_processes_only():
    cpu = torch.device("cpu")
    with pytest.raises(UnetsegError, match="--sync-bn.*2 CPU processes.*Fix"):
        check_sync_bn(True, SimpleNamespace(num_processes=2, device=cpu))
    check_sync_bn(True, SimpleNamespace(num_processes=1, device=cpu))
    check_sync_bn(False, SimpleNamespace(num_processes=2, device=cpu))


def test_one_process_keeps_its_buffers():
    net = torch.nn.BatchNorm2d(3)
    net.running_mean.fill_(0.5)
    sync_buffers(net, world=1)
    assert torch.equal(net.running_mean, torch.full((3,), 0.5))


def test_bf16_on_a_cpu_without_native_bf16_is_warned_of(monkeypatch):
    import torch

    from unetseg.runtime import slow_bf16_warning

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    warning = slow_bf16_warning("bf16", torch.device("cpu"))
    assert warning and "no AVX-512 BF16 or AMX" in warning and "Fix: --mixed-precision no" in warning
    assert slow_bf16_warning("no", torch.device("cpu")) is None
    assert slow_bf16_warning("bf16", torch.device("cuda")) is None
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert slow_bf16_warning("bf16", torch.device("cpu")) is None
