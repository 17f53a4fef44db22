"""Generation under ZeRO-3: the whole model gathered once per generation pass, or synced stepping.

ZeRO-3 keeps 1/world of every weight on a rank and all-gathers each submodule's weights in its
forward pass, then frees them. `generate` makes one forward pass per new token, so a plain call
all-gathers every weight for every token (minutes per evaluation for a 135M model on two CPU
workers, hours at 70B over a network), and every rank must keep stepping until all are done
(`synced_gpus`). `GatheredParameters` alone does not help: the module hooks re-partition after
each submodule. Gathered generation lifts those hooks for the pass, as TRL's
`unwrap_model_for_generation` does (DeepSpeed ships it: `deepspeed.runtime.zero.unwrap_model_for_generation`),
so each rank generates on its own with the full weights and no collective per token. Evaluation
passes (the validation and test losses) run the same way: one gather per pass instead of one per
forward pass (gloo moves the whole model per batch otherwise: half the test phase's time under ZeRO-3
on two CPU workers).

It needs the full weights once more on every worker for the pass. `eval.generate.zero3` chooses:
"gathered", "synced", or "auto": gathered where the weights (with HEADROOM for the key/value cache)
fit the free memory of every worker, measured when the pass starts (a GPU's free memory; on CPU
the host's available memory shared by its workers), synced otherwise. Never imports ray.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

HEADROOM = 1.25  # the gathered weights times this must fit: the key/value cache and activations on top


@dataclass(frozen=True)
class GenerationWeights:
    """How a generation pass runs: with the whole model on each rank (gathered), or with the ranks
    stepping together (synced: ZeRO-3's per-token all-gathers need every rank in every step)."""
    gathered: bool
    synced: bool
    weight_bytes: int = 0  # the whole model's weights, as gathered
    free_bytes: int = 0  # the least free memory of any worker when the pass started

    def describe(self) -> str:
        sizes = f"{self.weight_bytes / 2**30:.2f} GiB of weights, {self.free_bytes / 2**30:.1f} GiB free per worker"
        if self.gathered:
            return f"generation under ZeRO-3: the whole model gathered on each worker for each pass ({sizes})"
        return (f"generation under ZeRO-3: synced, every new token all-gathers every weight ({sizes}; "
                f"eval.generate.zero3: gathered takes seconds where this takes minutes, if memory allows)")


def gather_fits(weight_bytes: int, free_bytes: int) -> bool:
    """Whether the whole model can be gathered on a worker with `free_bytes` free."""
    return weight_bytes * HEADROOM <= free_bytes


def choose(mode: str, zero_stage: int, world: int, weight_bytes: int, free_bytes: int) -> GenerationWeights:
    """The generation pass's way to run (pure): ZeRO stages below 3 hold the whole model already."""
    if zero_stage != 3:
        return GenerationWeights(gathered=False, synced=False)
    gathered = mode == "gathered" or (mode == "auto" and gather_fits(weight_bytes, free_bytes))
    return GenerationWeights(gathered, synced=not gathered and world > 1, weight_bytes=weight_bytes,
                             free_bytes=free_bytes)


def weight_bytes(model) -> int:
    """The whole model's weights in bytes, also when ZeRO-3 has partitioned them away."""
    import math

    from trainer.model import full_shape

    return sum(math.prod(full_shape(p)) * p.element_size() for p in model.parameters())


def free_bytes(device) -> int:
    """Memory this worker could take now: the GPU's free memory, or on CPU the host's available
    memory divided among the workers on the host (LOCAL_WORLD_SIZE, which Ray Train sets)."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    available = 0
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    return available // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


@contextmanager
def generation_weights(engine, mode: str, zero_stage: int, world: int, device) -> Iterator[GenerationWeights]:
    """Around one generation pass (every rank together: the choice and the gather are collective).
    Gathered: ZeRO-3's hooks are lifted and the weights whole until the block ends, then partitioned
    and hooked again for training; the model must not be changed inside the block."""
    if zero_stage != 3:
        yield choose(mode, zero_stage, world, 0, 0)
        return
    import torch
    import torch.distributed as dist

    least_free = torch.tensor([free_bytes(device)], dtype=torch.int64, device=device)
    if world > 1 and mode == "auto":
        dist.all_reduce(least_free, op=dist.ReduceOp.MIN)  # every rank must choose the same
    way = choose(mode, zero_stage, world, weight_bytes(engine.module), int(least_free.item()))
    if not way.gathered:
        yield way
        return
    from deepspeed.runtime.zero import unwrap_model_for_generation

    with unwrap_model_for_generation(engine):
        yield way
