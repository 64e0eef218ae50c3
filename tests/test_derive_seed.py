"""derive_seed (issue 22, item 10): distinct tuples give distinct seeds, trailing zeros and
parts of 32 bits or more included, while the tuple shapes in use keep the seeds they had,
so a run resumed across the change keeps its shard order, shuffle and augmentation."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from unetseg.stream import derive_seed


def old_derive_seed(*parts: int) -> int:
    """derive_seed as it was at dde16e7: the parts straight into SeedSequence."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def test_tuples_that_differ_by_trailing_zeros_get_distinct_seeds():
    assert old_derive_seed(0, 1, 0) == old_derive_seed(0, 1, 0, 0) == old_derive_seed(0, 1)  # the hole
    assert len({derive_seed(0, 1), derive_seed(0, 1, 0), derive_seed(0, 1, 0, 0)}) == 3
    assert derive_seed() != derive_seed(0) != derive_seed(0, 0)
    assert derive_seed(5, 2, 0, 3, 0) != derive_seed(5, 2, 0, 3, 0, 0)


def test_a_part_of_32_bits_or_more_is_not_read_as_two_parts():
    assert old_derive_seed(2**32) == old_derive_seed(0, 1)  # SeedSequence splits it into words
    assert derive_seed(2**32) != derive_seed(0, 1)
    assert derive_seed(2**32, 3, 0) != derive_seed(0, 1, 3, 0)
    assert derive_seed(2**32 + 7, 1, 0) != derive_seed(7, 1, 0)


def test_every_small_tuple_gets_its_own_entropy_and_seed():
    """All tuples of 0..7 parts from {0, 1, 2**32}: the words SeedSequence hashes (padded
    to its 4-word pool as it pads them) differ for each, and so do the seeds."""
    from unetseg.stream import _entropy

    tuples = [t for n in range(8) for t in itertools.product((0, 1, 2**32), repeat=n)]
    hashed = {tuple(w) + (0,) * (4 - len(w)) for w in map(_entropy, tuples)}
    assert len(hashed) == len(tuples)
    assert len({derive_seed(*t) for t in tuples}) == len(tuples)


def test_negative_parts_are_refused():
    with pytest.raises(ValueError, match="non-negative"):
        derive_seed(1, -1, 0)


# The shapes derive_seed is called with (grep -rn derive_seed unetseg): the epoch's shard
# order (seed, epoch, 0) and train.py's process seed (seed, rank, 2); the shuffle buffer
# (seed, epoch, rank, worker, cycle); augmentation (seed, epoch, rank, batch, slot, 1) and
# preview's (seed, 0, 0, i, 0, 1).
CALL_SHAPES = {
    "shard order": lambda r: (r.seed, r.epoch, 0),
    "process seed": lambda r: (r.seed, r.rank, 2),
    "shuffle buffer": lambda r: (r.seed, r.epoch, r.rank, r.worker, r.cycle),
    "augmentation": lambda r: (r.seed, r.epoch, r.rank, r.batch, r.slot, 1),
    "preview": lambda r: (r.seed, 0, 0, r.batch, 0, 1),
}


class Draw:
    """Values of the call sites' parts: small ones as in real runs, the largest seed that
    fits 32 bits, and all zeros (the first batch of seed 0)."""

    def __init__(self, rng: random.Random | None):
        if rng is None:
            self.seed = self.epoch = self.rank = self.worker = self.cycle = self.batch = self.slot = 0
            return
        self.seed = rng.choice([0, 1, 42, 1234, 2**31, 2**32 - 1, rng.randrange(2**32)])
        self.epoch, self.rank, self.worker = rng.randrange(1000), rng.randrange(64), rng.randrange(16)
        self.cycle, self.batch, self.slot = rng.randrange(3), rng.randrange(10**5), rng.randrange(64)


@pytest.mark.parametrize("shape", list(CALL_SHAPES))
def test_the_call_shapes_in_use_keep_their_seeds(shape):
    rng = random.Random(shape)
    for draw in [Draw(None)] + [Draw(rng) for _ in range(200)]:
        parts = CALL_SHAPES[shape](draw)
        assert derive_seed(*parts) == old_derive_seed(*parts), parts
