"""Validation and test metrics, exact across ranks: every example is counted once.

Each rank evaluates a strided shard (no DistributedSampler padding). For causal LMs the ranks sum
loss/tokens/correct and one all_reduce adds the sums; for classification the per-example predictions
are gathered by example id and the metrics computed over all of them. Never imports ray.
"""
from __future__ import annotations

import math
from typing import Callable

from trainer.masking import IGNORE
from trainer.splits import eval_batch_count, eval_shard


def metrics_from_sums(loss_sum: float, tokens: float, correct: float, examples: float) -> dict[str, float]:
    """Token-level mean loss, perplexity and next-token accuracy from summed statistics."""
    loss = loss_sum / max(tokens, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "token_accuracy": correct / max(tokens, 1.0),
            "tokens": tokens, "examples": examples}


def batch_sums(logits, labels):
    """(loss_sum, tokens, correct) of a causal LM batch; position t predicts token t + 1."""
    import torch.nn.functional as F

    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    mask = target != IGNORE
    loss_sum = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                               ignore_index=IGNORE, reduction="sum")
    correct = ((logits.argmax(-1) == target) & mask).sum()
    return loss_sum, mask.sum(), correct


def evaluate(forward: Callable, examples: list[dict], collate, rank: int, world: int,
             batch_size: int, device) -> dict[str, float]:
    """Metrics of `forward` (a callable taking a batch dict, returning logits) over all `examples`."""
    import torch
    import torch.distributed as dist

    shard = eval_shard(len(examples), rank, world)
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    with torch.no_grad():
        for b in range(eval_batch_count(len(examples), world, batch_size)):
            chunk = shard[b * batch_size:(b + 1) * batch_size]
            # A rank whose shard ran out still joins the forward pass (ZeRO-3 gathers weights across
            # ranks) on a stand-in example, and its statistics are dropped.
            weight = 1.0 if chunk else 0.0
            batch = collate([examples[i] for i in (chunk or [0])])
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = forward(batch)
            loss_sum, tokens, correct = batch_sums(logits, batch["labels"])
            sums += weight * torch.stack([loss_sum.double(), tokens.double(), correct.double(),
                                          torch.tensor(float(len(chunk)), dtype=torch.float64, device=device)])
    if world > 1:
        dist.all_reduce(sums)
    return metrics_from_sums(*sums.tolist())


def classification_metrics(task: str, golds: list, preds: list, labels: list[str]) -> dict:
    """Task metrics over all examples (gathered from every rank, each example once)."""
    from trainer.metrics import accuracy, macro_f1, per_class_f1, span_prf

    if task == "token_classification":
        words = [(g, p) for gs, ps in zip(golds, preds) for g, p in zip(gs, ps)]
        return {**span_prf(golds, preds), "token_accuracy": accuracy([g for g, _ in words], [p for _, p in words])}
    return {"accuracy": accuracy(golds, preds), "macro_f1": macro_f1(golds, preds, labels),
            "per_class_f1": per_class_f1(golds, preds, labels)}


def evaluate_classification(task: str, forward: Callable, prepared, collate, rank: int, world: int,
                            batch_size: int, device, labels: list[str]) -> tuple[dict, list[dict]]:
    """Metrics and per-example predictions; predictions are gathered from all ranks by example id,
    so an uneven split is counted exactly once (no sampler padding to drop)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from trainer.tasks import predictions

    shard = eval_shard(len(prepared.examples), rank, world)
    local, loss_sum, count = [], 0.0, 0
    with torch.no_grad():
        for b in range(eval_batch_count(len(prepared.examples), world, batch_size)):
            chunk = shard[b * batch_size:(b + 1) * batch_size]
            batch = collate([prepared.examples[i] for i in (chunk or [0])])
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = forward(batch)  # every rank runs it (ZeRO-3); a stand-in batch's result is dropped
            if not chunk:
                continue
            target = batch["labels"]
            loss_sum += float(F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), target.reshape(-1),
                                              ignore_index=IGNORE, reduction="sum"))
            count += int((target != IGNORE).sum())
            words = [(len(prepared.golds[i]), prepared.words[i]) for i in chunk] if prepared.words else []
            preds = predictions(task, logits, batch, labels, words)
            local += [{"id": prepared.ids[i], "gold": prepared.golds[i], "predicted": p} for i, p in zip(chunk, preds)]
    parts = [(local, loss_sum, count)]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, (local, loss_sum, count))
    rows = sorted((r for part in parts for r in part[0]), key=lambda r: r["id"])
    total_loss, total_count = sum(p[1] for p in parts), sum(p[2] for p in parts)
    metrics = {"loss": total_loss / max(total_count, 1), "examples": float(len(rows)),
               **classification_metrics(task, [r["gold"] for r in rows], [r["predicted"] for r in rows], labels)}
    return metrics, rows
