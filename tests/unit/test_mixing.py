"""Training mixes: an epoch's draws from weighted sources, as a pure function, and the micro-batch
stream over them (deterministic, resumable mid-epoch)."""
from collections import Counter
from itertools import islice

import pytest

from trainer.mixing import draws_per_source, epoch_order


def test_draws_are_proportional_to_the_weights_and_fill_the_epoch():
    assert draws_per_source([100, 100], [3, 1]) == [150, 50]
    assert draws_per_source([10, 5, 7], [1, 1, 1]) == [8, 7, 7]  # 22 draws: the remainder goes to the first
    assert sum(draws_per_source([13, 2, 5], [0.2, 5, 1.3])) == 20


def test_a_3_to_1_mix_draws_75_25_over_an_epoch():
    sizes = [400, 1200]  # the up-weighted source is the smaller: it is drawn 3 times, the other 1/3 of its rows
    order = epoch_order(sizes, [3, 1], seed=11, epoch=0)
    assert len(order) == sum(sizes)
    first = sum(1 for i in order if i < sizes[0]) / len(order)
    assert first == pytest.approx(0.75, abs=0.05)
    counts = Counter(i for i in order if i < sizes[0])
    assert set(counts) == set(range(sizes[0])) and set(counts.values()) == {3}  # each row as often as the next
    assert len(set(i for i in order if i >= sizes[0])) == sum(1 for i in order if i >= sizes[0])  # none twice


def test_the_order_is_a_function_of_seed_and_epoch():
    sizes, weights = [30, 50], [2, 1]
    assert epoch_order(sizes, weights, 5, 0) == epoch_order(sizes, weights, 5, 0)
    assert epoch_order(sizes, weights, 5, 0) != epoch_order(sizes, weights, 5, 1)
    assert epoch_order(sizes, weights, 5, 0) != epoch_order(sizes, weights, 6, 0)
    assert sorted(epoch_order(sizes, [30, 50], 5, 0)) == list(range(80))  # weights = sizes: every row once


class Rows(list):
    def examples(self, positions):
        return [self[i] for i in positions]


@pytest.mark.parametrize("world", [1, 2])
def test_micro_batches_over_a_mix_resume_at_the_same_place(world):
    from trainer.data import MicroBatches

    sizes, weights = [24, 40], [3, 1]
    rows = Rows(range(sum(sizes)))

    def order(epoch):
        return epoch_order(sizes, weights, 9, epoch)

    for rank in range(world):
        full = list(islice(MicroBatches(rows, rank, world, 4, seed=9, order=order), 20))  # into the 2nd epoch
        assert [x for b in full[:64 // (4 * world)] for x in b] == order(0)[rank::world]
        stream = MicroBatches(rows, rank, world, 4, seed=9, order=order)
        list(islice(stream, 5))
        resumed = MicroBatches(rows, rank, world, 4, seed=9, epoch=stream.epoch, position=stream.position, order=order)
        assert list(islice(resumed, 15)) == full[5:]
