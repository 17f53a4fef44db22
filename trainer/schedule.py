"""Optimizer steps and the learning-rate schedule over them, as pure functions.

How many optimizer steps a run takes (from the training split, the world size and the batch sizes;
preflight and the workers count the same way), how many of them warm up, and the schedule DeepSpeed
builds over them. Imports only the stdlib (transformers inside `lr_scheduler`).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from trainer.config import ConfigError

if TYPE_CHECKING:
    from trainer.config import OptimConfig


def micro_batches_per_epoch(n_train: int, world: int, micro_batch_size: int) -> int:
    """DistributedSampler gives each rank ceil(n / world) indices (padding by repetition)."""
    return math.ceil(math.ceil(n_train / world) / micro_batch_size)


def total_steps(n_train: int, world: int, micro_batch_size: int, accumulation: int,
                epochs: float, max_steps: int | None) -> int:
    """Optimizer steps of the run: max_steps when given, else epochs over the training split."""
    if max_steps is not None:
        return max_steps
    micro = micro_batches_per_epoch(n_train, world, micro_batch_size)
    if epochs * micro < accumulation:
        raise ConfigError(f"train.epochs = {epochs:g} is less than one optimizer step: an epoch is {micro} "
                          f"micro-batch(es) per worker and a step takes {accumulation} (train.gradient_accumulation); "
                          f"raise train.epochs or set train.max_steps")
    return math.ceil(epochs * micro / accumulation)


def warmup_steps(optim: OptimConfig, steps: int) -> int:
    """optim.warmup_steps when set, else optim.warmup_ratio of the run's steps (rounded up)."""
    return optim.warmup_steps or math.ceil(optim.warmup_ratio * steps)


def lr_scheduler(optim: OptimConfig, steps: int):
    """optimizer -> the schedule (optim.scheduler with its warmup over `steps`), as
    deepspeed.initialize takes it: DeepSpeed steps and checkpoints it with the optimizer."""
    def build(optimizer):
        from transformers import get_scheduler

        return get_scheduler(optim.scheduler, optimizer, num_warmup_steps=warmup_steps(optim, steps),
                             num_training_steps=steps)
    return build
