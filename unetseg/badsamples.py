"""Bad-sample accounting: each lost sample counted once, in a worker, on a rank, over ranks.

Owns the ``--max-bad-samples`` budget and the message the run stops with. The streams in
:mod:`unetseg.stream` decide what is bad (a sample that fails to decode, the part of a
shard that cannot be read); this module decides how it is counted and when to stop.

Bad data
    A bad sample is recorded once, by its shard and key (a truncated shard counts the
    samples it lost, from dataset.json's counts), however often the stream reads it again.
    Each worker keeps a :class:`BadLog`; batches carry the worker's new records to the
    main process, where :class:`StreamStats` merges them on the rank and
    ``StreamStats.reduce`` over ranks, and the run stops with a message listing each bad
    sample once as soon as more than ``max_bad_samples`` distinct samples were lost.
"""

from __future__ import annotations

from typing import Any

from unetseg.errors import UnetsegError

DEFAULT_MAX_BAD_SAMPLES = 10


class BadLog:
    """A worker's bad samples, each counted once: ``found`` maps an id (shard URL and
    sample key, or a shard's unreadable tail) to (samples lost, what happened). The
    ids not yet reported ride on the next batch the worker yields."""

    def __init__(self, budget: int | None):
        self.budget = budget
        self.found: dict[str, tuple[int, str]] = {}
        self.unsent: list[tuple[str, int, str]] = []
        self.fatal: str | None = None

    def add(self, ident: str, where: str, error: str, n: int = 1) -> None:
        if ident not in self.found:
            self.found[ident] = (n, f"{where}: {error}")
            self.unsent.append((ident, n, f"{where}: {error}"))

    @property
    def count(self) -> int:
        return sum(n for n, _ in self.found.values())

    @property
    def stop(self) -> bool:
        return self.fatal is not None or (self.budget is not None and self.count > self.budget)

    def tag(self, batch: dict[str, Any]) -> dict[str, Any]:
        batch["_bad"], self.unsent = self.unsent, []
        return batch

    def error_batch(self) -> dict[str, Any]:
        # Raising inside a worker reaches the main process wrapped in a traceback; a
        # marker batch lets the main process stop with a plain message instead.
        return self.tag({"_error": self.fatal or f"{self.count} bad samples, more than --max-bad-samples {self.budget}"})


class StreamStats:
    """The bad samples one rank's loader met, each once, merged from its workers (and,
    after :meth:`reduce`, from every rank). ``max_bad_samples=None``: no limit."""

    def __init__(self, max_bad_samples: int | None = DEFAULT_MAX_BAD_SAMPLES):
        self.max_bad_samples = max_bad_samples
        self.found: dict[str, tuple[int, str]] = {}

    @property
    def bad_samples(self) -> int:
        """Samples lost, each counted once (a truncated shard counts the samples it lost)."""
        return sum(n for n, _ in self.found.values())

    def problems(self) -> list[str]:
        """What went wrong, one line per bad sample or unreadable part of a shard."""
        return [what for _, what in sorted(self.found.values(), key=lambda item: item[1])]

    def update(self, batch: dict[str, Any]) -> None:
        for ident, n, what in batch.pop("_bad", ()):
            self.found.setdefault(ident, (n, what))
        if "_error" in batch:
            self.fail(batch["_error"])
        if self.max_bad_samples is not None and self.bad_samples > self.max_bad_samples:
            self.fail()

    def fail(self, reason: str | None = None) -> None:
        lines = self.problems()
        shown = "\n  ".join(lines[:20]) + (f"\n  ... and {len(lines) - 20} more" if len(lines) > 20 else "")
        head = reason or f"{self.bad_samples} bad samples, more than --max-bad-samples {self.max_bad_samples}"
        raise UnetsegError(
            f"{head}:\n  {shown or '(no detail)'}\n"
            "Fix: run `unetseg shards verify` on the shard folder and re-pack the shards it names, "
            "or raise --max-bad-samples"
        )

    def reduce(self) -> int:
        """Merge every rank's bad samples (a collective: every rank must call it) and
        return how many samples were lost over all ranks, each counted once."""
        from unetseg.distributed import all_gather_objects

        for found in all_gather_objects(self.found):
            for ident, entry in found.items():
                self.found.setdefault(ident, tuple(entry))
        if self.max_bad_samples is not None and self.bad_samples > self.max_bad_samples:
            self.fail()
        return self.bad_samples
