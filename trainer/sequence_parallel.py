"""Ulysses sequence parallelism (scaling.sequence_parallel = N): each training sequence split over N
consecutive ranks, DeepSpeed's `UlyssesSPAttentionHF` exchanging heads for sequence in attention.

The ranks of one sequence-parallel group read the same micro-batch (the data-parallel rank is
rank // N of world // N): every batch size, step count and data position is in data-parallel terms,
so a checkpoint's position means the same at any N. Each rank keeps its 1/N of the positions
(`shard`); its loss is its positions' summed cross-entropy over the whole micro-batch's label count,
so the group's losses add up to the micro-batch's mean. Evaluation, the test and generation run
whole sequences, every rank its own examples (the attention wrapper steps aside in eval mode:
DeepSpeed's `disable_in_eval`), as without N. Checkpoints are DeepSpeed's usual ones (ZeRO
partitions over the whole world; DeepSpeed 0.19 names Ulysses checkpoints as mp_rank 00).
Imports torch and deepspeed inside functions; never ray.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from trainer.chunked_loss import shifted_targets
from trainer.masking import IGNORE


@dataclass(frozen=True)
class Layout:
    """Where a rank stands: its sequence-parallel group (of `size`) and its data-parallel rank."""
    size: int = 1  # N: ranks per sequence (1: no sequence parallelism)
    rank: int = 0  # this rank's place within its sequence's group
    dp_rank: int = 0
    dp_world: int = 1
    mpu: Any = None  # DeepSpeed's Ulysses process groups (parallel_state_sp), for deepspeed.initialize

    @property
    def on(self) -> bool:
        return self.size > 1


def layout(rank: int, world: int, size: int) -> Layout:
    """Ranks r*N .. r*N+N-1 share one sequence (DeepSpeed's parallel_state_sp builds the groups so)."""
    return Layout(size, rank % size, rank // size, world // size)


def head_refusal(config: Any, size: int) -> Optional[str]:
    """Why a model's attention heads cannot be split over `size` ranks (None: they can), as
    UlyssesSPAttentionHF checks: the query heads divide by N, the key/value heads divide by N or N by them."""
    if size == 1:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None)
    kv = getattr(text, "num_key_value_heads", None) or heads
    if heads is None:
        return "the model's config names no num_attention_heads"
    if heads % size:
        return f"the model has {heads} attention heads, which do not divide by {size}"
    if kv % size and size % kv:
        return f"the model has {kv} key/value heads: {size} must divide them or be a multiple of them"
    return None


_REGISTERED: dict[str, Any] = {}  # once per process: DeepSpeed's groups cannot be made twice


def register(model, size: int, micro_batch_size: int):
    """DeepSpeed's Ulysses attention in place of the model's own (sdpa, flash-attention, flex) for
    training; returns the mpu that deepspeed.initialize takes. Process-wide and once per process
    (DeepSpeed 0.19: the groups assert they are new, and transformers' attention function of that name
    is replaced for every model): a second call (the test phase after training) returns the first mpu."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    from trainer.config import ConfigError

    attention = getattr(model.config, "_attn_implementation", None)
    if "mpu" in _REGISTERED:
        if _REGISTERED["key"] != (size, attention):
            raise RuntimeError(f"sequence parallelism was set up for {_REGISTERED['key']} in this process, "
                               f"now asked for {(size, attention)}")
        return _REGISTERED["mpu"]
    if attention in (None, "eager"):
        raise ConfigError(f"scaling.sequence_parallel: the model's attention is {attention or 'unknown'}, which "
                          f"Ulysses cannot split (it needs the attention mask); set model.attn_implementation: sdpa")
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model, core_attn_implementation=attention, sequence_parallel_size=size,
        micro_batch_size=micro_batch_size, seq_length_is_variable=True, disable_in_eval=True)
    _REGISTERED.update(mpu=mpu, key=(size, attention))
    return mpu


def shard(batch: dict, rank: int, size: int, micro_batch_size: int) -> dict:
    """This rank's part of a collated causal-LM micro-batch (input_ids, labels; the attention mask is
    dropped: right padding is masked by causality and IGNORE labels): position_ids, and the labels
    shifted once here (position t predicts token t + 1, across the cut between ranks too) as
    shift_labels, each cut to positions [rank * L/N, (rank + 1) * L/N), L padded to a multiple of N;
    num_items_in_batch: the label count of the whole micro-batch, the same on every rank of the group.
    A short last micro-batch of an epoch is filled with unlabelled rows to micro_batch_size (Ulysses'
    attention is built for one batch size)."""
    import torch
    import torch.nn.functional as F

    ids, labels = batch["input_ids"], batch["labels"]
    rows, length = ids.shape
    width = -(-length // size) * size
    fill_rows = micro_batch_size - rows
    ids = F.pad(ids, (0, width - length, 0, max(fill_rows, 0)), value=0)
    labels = F.pad(labels, (0, width - length, 0, max(fill_rows, 0)), value=IGNORE)
    shifted = shifted_targets(labels).view(labels.shape)
    positions = torch.arange(width, device=ids.device).expand(ids.shape[0], width)
    part = slice(rank * width // size, (rank + 1) * width // size)
    # "labels" too: transformers computes a loss only when given labels; with shift_labels it shifts none.
    return {"input_ids": ids[:, part].contiguous(), "position_ids": positions[:, part].contiguous(),
            "labels": shifted[:, part].contiguous(), "shift_labels": shifted[:, part].contiguous(),
            "num_items_in_batch": (shifted != IGNORE).sum()}


def loss_scale(zero_stage: int, size: int) -> float:
    """What the loss is multiplied by before backward: DeepSpeed 0.19's ZeRO-3 averages gradients over
    the sequence-parallel ranks too (stages 1-2 add them), so it gets N (DeepSpeed#8854; transformers'
    deepspeed_sp_compute_loss corrects the same way before DeepSpeed 0.20.2)."""
    return float(size) if zero_stage == 3 and size > 1 else 1.0
