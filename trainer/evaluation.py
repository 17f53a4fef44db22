"""Sharded evaluation, exact across ranks: every example is counted once.

`Shard` runs a rank's strided part of a split through the model (no DistributedSampler padding),
every rank the same number of forward passes, and sums or gathers the results across ranks. What
is measured (token sums for causal LMs, gathered predictions for classifiers) is the task's.
Never imports ray.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

from trainer.splits import eval_batch_count, eval_shard


@dataclass(frozen=True)
class Shard:
    forward: Callable[[dict], Any]  # a batch (without labels) -> logits
    collate: Callable[[list[dict]], dict]
    rank: int
    world: int
    batch_size: int
    device: Any

    def batches(self, examples) -> Iterator[tuple[list[int], dict, Any]]:
        """(positions, batch, logits) for this rank's examples (a Prepared), without gradients. A rank whose shard
        ran out still joins the forward pass (ZeRO-3 gathers weights across ranks) on a stand-in
        example, whose result is dropped."""
        import torch

        shard = eval_shard(len(examples), self.rank, self.world)
        for b in range(eval_batch_count(len(examples), self.world, self.batch_size)):
            chunk = shard[b * self.batch_size:(b + 1) * self.batch_size]
            batch = self.collate(examples.examples(chunk or [0]))
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with torch.no_grad():
                logits = self.forward({k: v for k, v in batch.items() if k != "labels"})
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
