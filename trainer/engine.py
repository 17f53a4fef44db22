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


def import_deepspeed():
    """`import deepspeed`, the first time without the MLflow import that DeepSpeed's autotuner makes at
    import time wherever MLflow is installed (deepspeed.autotuning.autotuner, `try: import mlflow`):
    1.3 of the 3 s that importing DeepSpeed takes here, in every worker's start. Workers use neither
    DeepSpeed's autotuner nor MLflow (a run's controller is its trackers' one writer); a process that
    imported MLflow already (a test process, say) imports DeepSpeed as it is."""
    import sys

    if "deepspeed" not in sys.modules and "mlflow" not in sys.modules:
        sys.modules["mlflow"] = None  # `import mlflow` raises ImportError: the autotuner goes on without it
        try:
            import deepspeed
        finally:
            del sys.modules["mlflow"]
    import deepspeed

    return deepspeed


def init_distributed() -> None:
    """DeepSpeed adopts the orchestrator's process group (zero.Init needs it to build a model)."""
    deepspeed = import_deepspeed()

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

    # zero.Init reads this config without the sequence-parallel groups (trainer/sequence_parallel.py), so it
    # would check train_batch_size against the whole world; it needs no batch size: DeepSpeed derives one.
    alive = HfDeepSpeedConfig({k: v for k, v in ds_config.items() if k != "train_batch_size"})  # held weakly
    try:
        yield
    finally:
        del alive
        unset_hf_deepspeed_config()  # later builds (rank 0's export) are plain again


def build_engine(cfg: RunConfig, model, ds_config: dict, steps: int, mpu=None):
    """The DeepSpeed engine over the frozen-or-not model: AdamW (weight decay on matrices only) over
    the trainable parameters, the LR schedule over `steps` (trainer/schedule.py); `mpu`: the
    sequence-parallel groups (trainer/sequence_parallel.py), None without."""
    import deepspeed

    # Freeze first: ZeRO partitions and the optimizer hold only what they are given.
    decay = [p for p in model.parameters() if p.requires_grad and len(full_shape(p)) >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and len(full_shape(p)) < 2]
    groups = [g for g in ({"params": decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, lr_scheduler=lr_scheduler(cfg.optim, steps),
                                      config=ds_config, mpu=mpu)
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
    under ZeRO-3 two module-level holds of DeepSpeed (0.19) go too, each of which kept the training
    engine (weights, gradients, the optimizer's fp32 partitions and Adam moments) alive through the test
    phase, and the test engine through the export (#27): every ZeRO-3 model is appended to
    parameter_offload.FWD_MODULE_STACK and never taken off; and the parameter coordinator's
    `__params_to_release` is an lru_cache on the class, keyed by (coordinator, submodule, step), so the
    class held every coordinator, module and parameter (and through the parameters the optimizer) ever
    traced."""
    engine.destroy()
    from deepspeed.runtime.zero import parameter_offload

    mine = {id(m) for m in engine.module.modules()}
    parameter_offload.FWD_MODULE_STACK[:] = [m for m in parameter_offload.FWD_MODULE_STACK if id(m) not in mine]
    for cache in _release_caches():
        cache.cache_clear()  # a cache only: the next engine's coordinator fills it again


def _release_caches() -> list:
    """The lru_caches DeepSpeed keeps on ZeRO-3's PartitionedParameterCoordinator class (private:
    `__params_to_release`, wrapped by instrument_w_nvtx without functools.wraps, so the cache is
    found in the wrapper's closure). Empty where a DeepSpeed version has none."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    found = []
    for attribute in vars(PartitionedParameterCoordinator).values():
        for fn in (attribute, *(cell.cell_contents for cell in getattr(attribute, "__closure__", None) or ())):
            if hasattr(fn, "cache_clear") and fn not in found:
                found.append(fn)
    return found
