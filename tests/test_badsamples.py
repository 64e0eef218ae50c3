"""Bad-sample accounting: each lost sample counted once, and the run stopped past the budget.

The streams' side (what is skipped, what a truncated shard loses) is tested end to end in
test_stream.py; these tests pin the counting on its own, without shards or workers.
"""

from __future__ import annotations

import pytest

from unetseg.badsamples import BadLog, StreamStats
from unetseg.errors import UnetsegError


def test_a_worker_counts_a_sample_once_and_reports_it_on_one_batch():
    bad = BadLog(budget=2)
    bad.add("a.tar#k1", "a.tar sample 'k1'", "does not decode")
    bad.add("a.tar#k1", "a.tar sample 'k1'", "does not decode")  # read again in a later epoch
    bad.add("b.tar#tail@2", "b.tar", "2 samples lost", n=2)
    assert bad.count == 3 and bad.stop
    batch = bad.tag({"keys": ["k2"]})
    assert [ident for ident, _, _ in batch["_bad"]] == ["a.tar#k1", "b.tar#tail@2"]
    assert bad.tag({})["_bad"] == []  # sent once
    assert "more than --max-bad-samples 2" in bad.error_batch()["_error"]


def test_a_fatal_error_stops_a_worker_whatever_its_budget():
    bad = BadLog(budget=None)
    assert not bad.stop
    bad.fatal = "50 shards in a row gave no sample"
    assert bad.stop and bad.error_batch()["_error"] == "50 shards in a row gave no sample"


def test_stats_merge_workers_once_and_stop_past_the_budget():
    stats = StreamStats(max_bad_samples=2)
    stats.update({"_bad": [("a.tar#k1", 1, "a.tar sample 'k1': does not decode")]})
    stats.update({"_bad": [("a.tar#k1", 1, "a.tar sample 'k1': does not decode")]})  # from another worker
    assert stats.bad_samples == 1 and stats.reduce() == 1  # no process group: this rank only
    assert stats.problems() == ["a.tar sample 'k1': does not decode"]
    with pytest.raises(UnetsegError) as e:
        stats.update({"_bad": [("b.tar#tail@0", 2, "b.tar: 2 samples lost")]})
    assert "3 bad samples, more than --max-bad-samples 2" in str(e.value)
    assert "a.tar sample 'k1'" in str(e.value) and "b.tar: 2 samples lost" in str(e.value)
    assert "shards verify" in str(e.value)


def test_stats_without_a_budget_stop_only_on_a_worker_error():
    stats = StreamStats(max_bad_samples=None)
    stats.update({"_bad": [(f"a.tar#k{i}", 1, f"a.tar sample 'k{i}'") for i in range(100)]})
    assert stats.bad_samples == 100
    with pytest.raises(UnetsegError, match="50 shards in a row gave no sample"):
        stats.update({"_bad": [], "_error": "50 shards in a row gave no sample"})
