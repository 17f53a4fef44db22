"""Splitting, evaluation sharding and metric reduction: pure functions, exact counting."""
import math

import pytest

from trainer.config import ConfigError
from trainer.tasks.causal_lm import metrics_from_sums
from trainer.schedule import micro_batches_per_epoch, total_steps
from trainer.splits import eval_batch_count, eval_shard, split_indices


def test_split_is_deterministic_disjoint_and_complete():
    a = split_indices(101, (0.8, 0.1, 0.1), seed=3)
    assert a == split_indices(101, (0.8, 0.1, 0.1), seed=3)
    assert a != split_indices(101, (0.8, 0.1, 0.1), seed=4)
    train, val, test = a
    assert (len(train), len(val), len(test)) == (81, 10, 10)
    assert sorted(train + val + test) == list(range(101))


def test_tiny_data_cannot_be_split():
    with pytest.raises(ConfigError, match="at least 3 are needed"):
        split_indices(2, (0.8, 0.1, 0.1), 0)


@pytest.mark.parametrize("n, world", [(35, 2), (7, 3), (1, 4), (10, 5)])
def test_eval_shards_count_every_example_once(n, world):
    shards = [eval_shard(n, r, world) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    batches = eval_batch_count(n, world, batch_size=4)
    assert all(math.ceil(len(s) / 4) <= batches for s in shards)


def test_reduced_sums_equal_single_process_metrics_with_an_uneven_split():
    # per-example (loss_sum, tokens, correct); 7 examples over 3 ranks
    stats = [(2.0, 4, 1), (3.0, 5, 2), (1.0, 2, 2), (4.0, 8, 3), (0.5, 1, 1), (2.5, 3, 0), (6.0, 9, 4)]
    world = 3
    per_rank = [[stats[i] for i in eval_shard(len(stats), r, world)] for r in range(world)]
    reduced = [sum(x[k] for shard in per_rank for x in shard) for k in range(3)]
    single = [sum(x[k] for x in stats) for k in range(3)]
    assert reduced == single
    m = metrics_from_sums(*reduced, examples=7)
    assert m["loss"] == pytest.approx(19.0 / 32) and m["token_accuracy"] == pytest.approx(13 / 32)
    assert m["perplexity"] == pytest.approx(math.exp(19.0 / 32))


def test_steps_follow_the_distributed_sampler():
    assert micro_batches_per_epoch(285, 2, 8) == 18  # ceil(143 / 8)
    assert total_steps(285, 2, 8, 3, epochs=1, max_steps=None) == 6
    assert total_steps(285, 2, 8, 1, epochs=2, max_steps=None) == 36
    assert total_steps(285, 2, 8, 1, epochs=1, max_steps=5) == 5


class Items(list):
    """A list served the way a prepared split serves its examples."""

    def examples(self, positions):
        return [self[i] for i in positions]


def test_micro_batches_follow_distributed_sampler_and_resume_mid_epoch():
    pytest.importorskip("torch")
    from itertools import islice

    from torch.utils.data import DistributedSampler

    from trainer.data import MicroBatches

    examples = list(range(23))
    for rank in (0, 1):
        sampler = DistributedSampler(examples, num_replicas=2, rank=rank, shuffle=True, seed=5)
        expected = []
        for epoch in (0, 1, 2):
            sampler.set_epoch(epoch)
            order = list(sampler)
            expected += [order[i:i + 4] for i in range(0, len(order), 4)]
        full = list(islice(MicroBatches(Items(examples), rank, 2, 4, seed=5), 9))
        assert full == expected[:9]  # the same order DistributedSampler gives, epoch after epoch
        stream = MicroBatches(Items(examples), rank, 2, 4, seed=5)
        list(islice(stream, 4))
        resumed = MicroBatches(Items(examples), rank, 2, 4, seed=5, epoch=stream.epoch, position=stream.position)
        assert list(islice(resumed, 5)) == full[4:]


@pytest.mark.parametrize("old, new", [(2, 1), (1, 2), (2, 3)])
def test_changing_world_size_mid_epoch_neither_repeats_nor_skips(old, new):
    pytest.importorskip("torch")
    from itertools import islice

    from trainer.data import MicroBatches

    examples = list(range(41))
    first = [MicroBatches(Items(examples), r, old, 3, seed=1) for r in range(old)]
    seen = [x for stream in first for batch in islice(stream, 2) for x in batch]
    epoch, position = first[0].epoch, first[0].position
    assert position == 2 * 3 * old and epoch == 0
    rest = [MicroBatches(Items(examples), r, new, 3, seed=1, epoch=epoch, position=position) for r in range(new)]
    for stream in rest:
        while stream.epoch == 0:
            seen += next(stream)
    assert set(seen) == set(examples)
    assert len(seen) - len(set(seen)) < new  # only the padding to a multiple of the world size repeats
