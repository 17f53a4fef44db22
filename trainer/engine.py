"""The DeepSpeed engine of a worker: the process group adopted, the model built partitioned under
ZeRO-3, the engine with its optimizer groups and LR schedule, and the loop's own gradient norm.

The DeepSpeed config itself is trainer/ds_config.py (pure, shared with preflight); checkpoints are
trainer/checkpoints.py. Imports deepspeed, torch and transformers inside functions; never ray.
"""
from __future__ import annotations

from contextlib import contextmanager

from trainer.config import RunConfig
from trainer.model import full_shape
from trainer.schedule import lr_scheduler


def init_distributed() -> None:
    """DeepSpeed adopts the orchestrator's process group (zero.Init needs it to build a model)."""
    import deepspeed

    # DeepSpeed 0.19.8 (private): the shared-memory all-reduce op is JIT-compiled on first use (by
    # init_distributed) and serves only inference; mark it incompatible so it is never built.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed()


@contextmanager
def partitioned_build(ds_config: dict):
    """Under ZeRO-3, models built inside this block are created partitioned across the ranks: the
    transformers DeepSpeed integration wraps from_pretrained / from_config in deepspeed.zero.Init
    while an HfDeepSpeedConfig is alive (every rank must build together). Other stages: no effect."""
    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    alive = HfDeepSpeedConfig(ds_config)  # transformers holds only a weak reference to it
    try:
        yield
    finally:
        del alive
        unset_hf_deepspeed_config()  # later builds (rank 0's export) are plain again


def build_engine(cfg: RunConfig, model, ds_config: dict, steps: int):
    """The DeepSpeed engine over the frozen-or-not model: AdamW (weight decay on matrices only) over
    the trainable parameters, the LR schedule over `steps` (trainer/schedule.py)."""
    import deepspeed

    # Freeze first: ZeRO partitions and the optimizer hold only what they are given.
    decay = [p for p in model.parameters() if p.requires_grad and len(full_shape(p)) >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and len(full_shape(p)) < 2]
    groups = [g for g in ({"params": decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, lr_scheduler=lr_scheduler(cfg.optim, steps),
                                      config=ds_config)
    share_fp32_partitions(engine)  # ZeRO-3 in fp32: no second copy of the weights' partition
    return engine


def share_fp32_partitions(engine) -> None:
    """ZeRO-3 with weights in fp32 already: the optimizer's fp32 partition becomes the weights'
    partition itself, as DeepSpeed means it to (stage3.py, _create_fp32_partitions), instead of a
    copy that doubles every rank's share of the weights.

    DeepSpeed 0.19.8 (private attributes): that check compares a tensor's torch.device with the
    accelerator's device name, which is never equal ('cpu' != device('cpu')), so it always copies
    (257 MB per worker for SmolLM2-135M at 2 workers). Called before the first step, while the copy
    still equals the weights; every later update then writes the weights in place, as with autocast."""
    optimizer = getattr(engine, "optimizer", None)
    weights = getattr(optimizer, "fp16_partitioned_groups_flat", None) or []
    masters = getattr(optimizer, "fp32_partitioned_groups_flat", None) or []
    for weight, master in zip(weights, masters):
        if (weight is not None and weight.dtype == master.dtype and weight.device == master.device
                and weight.numel() == master.numel() and weight.data_ptr() != master.data_ptr()):
            master.data = weight.data


def grad_norm(parameters) -> float:
    """The global L2 norm of the gradients (the averaged ones, at an accumulation boundary). ZeRO's
    optimizers compute it; on stage 0 nothing does, so the loop calls this."""
    import torch

    norms = [torch.linalg.vector_norm(p.grad.float()) for p in parameters if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def release_engine(engine) -> None:
    """Let the engine, its model and all its states go (at the next gc). destroy() removes ZeRO's hooks;
    under ZeRO-3 the model is also unpinned: DeepSpeed (0.19) appends every ZeRO-3 model to a
    module-level stack (parameter_offload.FWD_MODULE_STACK) and never takes it off, which kept the
    training engine alive through the test phase and the test engine through the export (#27)."""
    engine.destroy()
    from deepspeed.runtime.zero import parameter_offload

    mine = {id(m) for m in engine.module.modules()}
    parameter_offload.FWD_MODULE_STACK[:] = [m for m in parameter_offload.FWD_MODULE_STACK if id(m) not in mine]
