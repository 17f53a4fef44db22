"""Deterministic train/validation/test splitting and evaluation sharding, as pure functions.

Every worker computes the same split from (size, fractions, seed), so no index lists travel
between processes. Imports only the stdlib.
"""
from __future__ import annotations

import math
import random
from typing import Sequence

from trainer.config import ConfigError


def split_indices(n: int, fractions: Sequence[float], seed: int) -> tuple[list[int], list[int], list[int]]:
    """Shuffle range(n) with `seed` and cut it into train / validation / test by `fractions`.

    Validation and test sizes are rounded down (at least 1 each); the remainder goes to train.
    """
    if n < 3:
        raise ConfigError(f"the data set has {n} usable examples; at least 3 are needed to split it "
                          f"into train, validation and test")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = max(1, math.floor(n * fractions[1]))
    n_test = max(1, math.floor(n * fractions[2]))
    n_train = n - n_val - n_test
    if n_train < 1:
        raise ConfigError(f"data.fractions {list(fractions)} leave no training example out of {n}")
    return order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]


def eval_shard(n: int, rank: int, world: int) -> list[int]:
    """Positions 0..n-1 this rank evaluates: a strided slice, so every position is taken exactly once.

    Unlike DistributedSampler there is no padding: an uneven split is not double-counted.
    """
    return list(range(rank, n, world))


def eval_batch_count(n: int, world: int, batch_size: int) -> int:
    """Forward passes every rank runs, equal on all ranks (ZeRO-3 gathers weights collectively),
    so ranks with a shorter shard run padding batches whose results are discarded."""
    longest = math.ceil(n / world)
    return math.ceil(longest / batch_size)
