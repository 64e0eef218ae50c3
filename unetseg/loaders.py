"""The DataLoader around the streams, and its workers' signals: the streams batch
themselves, seed themselves, and must survive a launcher's SIGTERM long enough for
their training process to checkpoint.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from unetseg.badsamples import StreamStats
from unetseg.stream import EvalStream, TrainStream


def iterate(loader: DataLoader, stats: StreamStats) -> Iterator[dict[str, Any]]:
    """Batches of ``loader`` with the bad-sample bookkeeping taken off and checked."""
    for batch in loader:
        stats.update(batch)
        if "_empty" not in batch:
            yield batch


def make_loader(dataset: TrainStream | EvalStream, num_workers: int = 0, pin_memory: bool | None = None) -> DataLoader:
    """A DataLoader over a stream that batches itself. Eval loaders keep their workers
    between evaluations (the stream is stateless); the train stream is endless, so its
    workers start once anyway."""
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=num_workers > 0 and isinstance(dataset, EvalStream),
        prefetch_factor=4 if num_workers > 0 else None,
        worker_init_fn=_worker_init,
        # A DataLoader draws a seed from its generator each time it is iterated; with the
        # default (global) one, an evaluation would shift the training RNG and break
        # exact resume. The streams seed themselves, so this seed is never used.
        generator=torch.Generator().manual_seed(0),
    )


def _worker_init(worker_id: int) -> None:
    # Ctrl-C reaches the whole process group: the training process handles it (checkpoint,
    # clean exit), so its workers must not die of it first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _sigterm_from_parent_only()


def _sigterm_from_parent_only() -> None:
    """Let this worker die of SIGTERM only when its own training process sends it.

    A launcher's SIGTERM reaches the workers too (torch elastic signals each rank's
    process group, SLURM every process of a job step); a worker that died of it would
    crash its training process before that could checkpoint. The training process
    itself sends SIGTERM to shut its workers down (DataLoader and multiprocessing
    clean-up), and that one must still work. So SIGTERM is blocked here and a thread
    takes it with ``sigwaitinfo``, which tells who sent it. Where that call does not
    exist (macOS), the default stays.
    """
    if not hasattr(signal, "sigwaitinfo"):
        return
    parent = os.getppid()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the training process's handler, inherited by fork
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit it

    def wait() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        # Die of it as an unblocked SIGTERM would have killed us: the DataLoader expects that.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

    threading.Thread(target=wait, name="sigterm-from-parent", daemon=True).start()
