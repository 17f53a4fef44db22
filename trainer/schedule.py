"""Optimizer steps and the learning-rate schedule over them, as pure functions.

How many optimizer steps a run takes (from the training split, the world size and the batch sizes;
preflight and the workers count the same way), how many micro-steps make one on a given world size (an
elastic run keeps its global batch across resizes), how many steps warm up, and the schedule DeepSpeed
builds over them. Imports only the stdlib and the config schema (transformers inside `lr_scheduler`).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from trainer.config import ConfigError

if TYPE_CHECKING:
    from trainer.config import OptimConfig, RunConfig, ScalingConfig, TrainConfig


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


def accumulation(scaling: ScalingConfig, train: TrainConfig, world: int) -> int:
    """Micro-steps per optimizer step on `world` workers. An elastic run (scaling.min_nodes < nodes)
    keeps the global batch of its starting size on every size it is resized to, so its LR schedule
    and step count do not change: the accumulation is recomputed for `world`. Any other run uses
    train.gradient_accumulation (a --resume on another size changes the global batch, as asked)."""
    if not scaling.is_elastic:
        return train.gradient_accumulation
    per_step = train.gradient_accumulation * scaling.world_size  # micro-batches per step, all ranks
    if per_step % world:
        raise ConfigError(f"{world} worker(s) cannot keep the global batch of {per_step} micro-batch(es) "
                          f"per step ({per_step * train.micro_batch_size} examples)")
    return per_step // world


def counts_losing_the_global_batch(scaling: ScalingConfig, train: TrainConfig) -> list[int]:
    """The worker counts of an elastic run's range on which the global batch of its starting size is not
    a whole number of micro-batches per worker."""
    per_step = train.gradient_accumulation * scaling.world_size
    return [w for w in range(scaling.min_world_size, scaling.world_size + 1) if per_step % w]


def check_elastic(cfg: RunConfig) -> None:
    """Preflight: every worker count an elastic run may be resized to keeps its global batch."""
    s, t = cfg.scaling, cfg.train
    if not s.is_elastic:
        return
    bad = counts_losing_the_global_batch(s, t)
    if bad:
        per_step = t.gradient_accumulation * s.world_size
        good = [w for w in range(s.min_world_size, s.world_size + 1) if w not in bad]
        raise ConfigError(
            f"scaling.min_nodes = {s.min_nodes}: the run may be resized to any worker count from {s.min_world_size} "
            f"to {s.world_size}, and the global batch ({t.micro_batch_size} x {t.gradient_accumulation} "
            f"train.gradient_accumulation x {s.world_size} workers = {per_step} micro-batch(es) per step) does not "
            f"divide among {', '.join(map(str, bad))} worker(s) (it does among {', '.join(map(str, good)) or 'none'}); "
            f"choose a train.gradient_accumulation that every count divides (for example "
            f"{_smallest_fit(s, t)}), or raise scaling.min_nodes")


def _smallest_fit(scaling: ScalingConfig, train: TrainConfig) -> int:
    """The smallest gradient accumulation >= train's with which every count of the range keeps the batch."""
    counts = range(scaling.min_world_size, scaling.world_size + 1)
    need = math.lcm(*counts) // math.gcd(math.lcm(*counts), scaling.world_size)
    return need * math.ceil(train.gradient_accumulation / need)


def steps_of_run(cfg: RunConfig, n_train: int, world: int) -> int:
    """The run's optimizer steps as `world` workers count them: an elastic run counts them at its
    starting size, so a resize changes neither the step count nor the LR schedule."""
    t = cfg.train
    if cfg.scaling.is_elastic:
        world = cfg.scaling.world_size
    return total_steps(n_train, world, t.micro_batch_size, accumulation(cfg.scaling, t, world), t.epochs, t.max_steps)


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
