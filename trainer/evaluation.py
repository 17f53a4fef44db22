"""Sharded evaluation, exact across ranks: every example is counted once.

`Shard` runs a rank's strided part of a split through the model (no DistributedSampler padding),
every rank the same number of forward passes (or `generate` calls), and sums or gathers the results
across ranks. What is measured (token sums for causal LMs, gathered predictions for classifiers,
generated answers) is the task's. Never imports ray.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from trainer.chunked_loss import LossImpl
from trainer.generation import stop_ids
from trainer.splits import eval_batch_count, eval_shard


@dataclass(frozen=True)
class Shard:
    forward: Callable[[dict], Any]  # a batch (without labels) -> logits
    collate: Callable[[list[dict]], dict]
    rank: int
    world: int
    batch_size: int
    device: Any
    generate: Optional[Callable[..., Any]] = None  # generator(model, ...): answers, every rank together
    model: Any = None  # the engine, for a task's own evaluation (see Task.evaluate)
    loss_impl: LossImpl = LossImpl("standard")  # train.loss_impl as resolved: chunked/liger evaluate per chunk
    config: Any = None  # the RunConfig, for a task's own evaluation settings (preference: its objective)

    def chunks(self, n: int) -> Iterator[list[int]]:
        """This rank's positions of 0..n-1, a batch at a time. Every rank gets the same number of
        batches: one whose shard ran out gets empty ones, and still joins the collective work (ZeRO-3
        gathers weights across ranks) on a stand-in example, whose result is dropped."""
        shard = eval_shard(n, self.rank, self.world)
        for b in range(eval_batch_count(n, self.world, self.batch_size)):
            yield shard[b * self.batch_size:(b + 1) * self.batch_size]

    def batches(self, examples, forward: Optional[Callable[[dict], Any]] = None) -> Iterator[tuple[list[int], dict, Any]]:
        """(positions, batch, logits) for this rank's examples (a Prepared), without gradients; see
        `chunks`. `forward`: a batch, labels included, -> what to yield instead of the logits."""
        import torch

        for chunk in self.chunks(len(examples)):
            batch = self.collate(examples.examples(chunk or [0]))
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with torch.no_grad():
                logits = forward(batch) if forward else self.forward({k: v for k, v in batch.items() if k != "labels"})
            if chunk:
                yield chunk, batch, logits

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over all ranks."""
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj: Any) -> list:
        """Every rank's `obj`, in rank order."""
        import torch.distributed as dist

        if self.world == 1:
            return [obj]
        parts = [None] * self.world
        dist.all_gather_object(parts, obj)
        return parts


def generator(model, synced: bool) -> Callable[..., Any]:
    """`model.generate(input_ids, attention_mask, max_new_tokens, **settings)` as every rank calls it
    together. `synced`: ZeRO-3 with several ranks gathers the weights in each forward pass (unless
    trainer/zero3_generation.py gathered them for the pass), so a rank whose answers ended keeps
    stepping until every rank's have (synced_gpus; without it the run hangs, transformers#20130). The
    key/value cache, off for training, is on for generation. New tokens stop at the model's position
    limit (GPT-2's learned positions would overflow), and at any end-of-sequence id of the caller's or
    of the model's generation config (a chat model's end of turn). Synced ranks share one budget, set
    by the widest prompt batch of any rank: a rank that keeps stepping for the others never passes
    the limit (each rank's batch has its own width)."""
    def generate(input_ids, attention_mask, max_new_tokens: int, **settings):
        import torch

        limit = getattr(model.config, "max_position_embeddings", None)
        if limit:
            width = input_ids.shape[1]
            if synced:
                import torch.distributed as dist

                widest = torch.tensor([width], dtype=torch.int64, device=input_ids.device)
                dist.all_reduce(widest, op=dist.ReduceOp.MAX)
                width = int(widest.item())
            max_new_tokens = max(1, min(max_new_tokens, limit - width))
        config = getattr(model, "generation_config", None)
        settings["eos_token_id"] = stop_ids(settings.get("eos_token_id"), getattr(config, "eos_token_id", None)) or None
        with torch.no_grad():
            return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                  use_cache=True, synced_gpus=synced, **settings)

    return generate


def scalars(metrics: dict) -> dict[str, float]:
    """An evaluation's metrics as reported and tracked: the numbers, without the counts behind them."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k not in ("tokens", "examples")}
