"""Training mixes (data.train_file as a list of weighted sources): which rows each epoch draws.

An epoch of a mix has as many draws as the sources have rows together, N = sum of their sizes
(prepared rows: after bad rows are left out, packed rows with data.packing), so an epoch is as
long as one of the unweighted concatenation and the step count does not depend on the weights.
Source i gets N * w_i / sum(w) of them (rounded by largest remainder, so they add up to N). Its
rows come from seeded permutations of that source, one after another when it is drawn more often
than it has rows (every row once before any twice), and the whole epoch is shuffled with the seed.
A pure function of (sizes, weights, seed, epoch): every rank computes the same order, and a
resumed run finds its place in it by the saved (epoch, position). Imports numpy inside functions.
"""
from __future__ import annotations

from typing import Sequence


def draws_per_source(sizes: Sequence[int], weights: Sequence[float]) -> list[int]:
    """How many of an epoch's sum(sizes) draws each source gets: proportional to its weight,
    rounded by largest remainder (ties to the earlier source) so they add up exactly."""
    n, total = sum(sizes), float(sum(weights))
    exact = [n * w / total for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[:n - sum(counts)]:
        counts[i] += 1
    return counts


def epoch_order(sizes: Sequence[int], weights: Sequence[float], seed: int, epoch: int) -> list[int]:
    """The epoch's draws as row indices into the sources concatenated in order (source i's rows
    start at sum(sizes[:i])), shuffled."""
    import numpy as np

    key = [seed % 2**63, epoch]  # numpy's seed sequences take non-negative integers
    picks, offset = [], 0
    for i, (size, count) in enumerate(zip(sizes, draws_per_source(sizes, weights))):
        rng = np.random.default_rng([*key, i])
        laps = -(-count // size) if size else 0
        rows = np.concatenate([rng.permutation(size) for _ in range(laps)]) if laps else np.zeros(0, np.int64)
        picks.append(rows[:count] + offset)
        offset += size
    order = np.concatenate(picks) if picks else np.zeros(0, np.int64)
    return np.random.default_rng([*key, len(sizes)]).permutation(order).tolist()
