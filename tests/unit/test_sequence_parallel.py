"""scaling.sequence_parallel (trainer/sequence_parallel.py): the shards, the groups, the refusals by key
and what --dry-run says. The training itself: tests/ranks/test_sequence_parallel_ranks.py."""
import pytest
import torch

from tests.helpers import tiny_config, tiny_llama, write_config
from tests.helpers import run_cli as cli
from trainer.config import ConfigError
from trainer.config_load import from_dict
from trainer.masking import IGNORE
from trainer.sequence_parallel import Layout, head_refusal, layout, loss_scale, shard

BASE = {"model": {"name_or_path": "gpt2"}, "data": {"train_file": "x.jsonl"}}


def test_the_shards_put_back_together_are_the_shifted_micro_batch():
    """Length 7 over 3 ranks: padded to 9; the labels shifted once across the cuts; each rank the same
    label count (the whole micro-batch's); a short micro-batch filled with unlabelled rows."""
    ids = torch.arange(1, 15).reshape(2, 7)
    labels = ids.clone()
    labels[0, :3] = IGNORE  # a prompt
    parts = [shard({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}, r, 3, 3)
             for r in range(3)]
    assert all("attention_mask" not in p for p in parts)
    whole = {k: torch.cat([p[k] for p in parts], dim=1) for k in ("input_ids", "position_ids", "shift_labels")}
    assert whole["input_ids"].shape == (3, 9)  # micro-batch 3: one filled row; 7 -> 9 positions
    assert torch.equal(whole["input_ids"][:2, :7], ids) and not whole["input_ids"][:, 7:].any()
    assert torch.equal(whole["position_ids"], torch.arange(9).expand(3, 9))
    want = torch.full((3, 9), IGNORE)
    want[:2, :6] = labels[:, 1:]
    assert torch.equal(whole["shift_labels"], want)
    assert [int(p["num_items_in_batch"]) for p in parts] == [int((want != IGNORE).sum())] * 3 == [4 + 6] * 3
    assert all(torch.equal(p["labels"], p["shift_labels"]) and p["input_ids"].is_contiguous() for p in parts)


def test_groups_are_consecutive_ranks_and_batches_count_data_parallel_ranks():
    assert layout(3, 4, 2) == Layout(size=2, rank=1, dp_rank=1, dp_world=2)  # ranks 2 and 3 share sequences
    assert layout(5, 6, 3) == Layout(size=3, rank=2, dp_rank=1, dp_world=2)
    assert not layout(0, 2, 1).on and layout(0, 2, 2).on
    assert from_dict({**BASE, "scaling": {"nodes": 2, "workers_per_node": 4, "sequence_parallel": 4}}).scaling \
        .data_parallel_size == 2
    assert (loss_scale(3, 2), loss_scale(2, 2), loss_scale(3, 1)) == (2.0, 1.0, 1.0)


class Heads:
    def __init__(self, heads, kv):
        self.num_attention_heads, self.num_key_value_heads = heads, kv


def test_heads_must_split_over_the_ranks_as_ulysses_needs():
    """SmolLM2-135M: 9 heads, 3 key/value heads: 3 splits them, 2 does not."""
    assert head_refusal(Heads(9, 3), 3) is None
    assert head_refusal(Heads(9, 3), 2) == "the model has 9 attention heads, which do not divide by 2"
    assert head_refusal(Heads(4, 2), 4) is None  # more ranks than key/value heads: they are repeated
    assert head_refusal(Heads(12, 4), 6) == "the model has 4 key/value heads: 6 must divide them or be a multiple of them"


@pytest.mark.parametrize("sections, words", [
    ({"scaling": {"workers_per_node": 2, "sequence_parallel": 3}}, "scaling.sequence_parallel = 3 must divide the worker count"),
    ({"scaling": {"nodes": 2, "min_nodes": 1, "sequence_parallel": 2}}, "with scaling.min_nodes (elastic continuation)"),
    ({"deepspeed": {"zero_stage": 0}}, "deepspeed.zero_stage 0 is not supported"),
    ({"data": {"train_file": "x.jsonl", "packing": True}}, "data.packing needs a varlen attention"),
    ({"model": {"name_or_path": "gpt2", "attn_implementation": "eager"}}, "model.attn_implementation eager"),
    ({"train": {"loss_impl": "liger"}}, "train.loss_impl liger is not verified"),
    ({"model": {"name_or_path": "bert", "task": "sequence_classification"}}, "has no sequence-parallel objective"),
])
def test_what_ulysses_cannot_do_is_refused_by_key(sections, words):
    raw = {**BASE, "scaling": {"workers_per_node": 2, "sequence_parallel": 2}, "deepspeed": {"zero_stage": 2}, **sections}
    with pytest.raises(ConfigError, match="scaling.sequence_parallel") as err:
        from_dict(raw, "cfg.yaml")
    assert words in str(err.value) and str(err.value).startswith("cfg.yaml")


def test_dry_run_counts_data_parallel_ranks_and_refuses_heads_that_do_not_split(tmp_path, tokenizer_dir):
    raw = tiny_config(tmp_path, tokenizer_dir, model={"architecture": tiny_llama(2), "tokenizer": str(tokenizer_dir)},
                      scaling={"workers_per_node": 2, "sequence_parallel": 2})
    proc = cli(write_config(tmp_path / "c.yaml", raw), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert ("world size 2 (1 node(s) x 2 worker(s)); each sequence split over 2 consecutive workers "
            "(scaling.sequence_parallel, Ulysses): 1 data-parallel rank(s); micro batch 8 per data-parallel rank "
            "x accumulation 1 = global batch 8") in proc.stdout
    assert "(micro batch 8 x 48 tokens (data.max_length / scaling.sequence_parallel) x vocab 400" in proc.stdout
    raw["model"]["architecture"] = {**tiny_llama(2), "num_attention_heads": 1, "num_key_value_heads": 1}
    proc = cli(write_config(tmp_path / "c.yaml", raw), "--dry-run")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert ("scaling.sequence_parallel = 2: the model has 1 attention heads, which do not divide by 2") in proc.stderr
