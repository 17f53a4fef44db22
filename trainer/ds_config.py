"""The DeepSpeed config, derived from ours: the only source of batch sizes and accumulation steps.

Pure: stdlib + our config only, so it is unit-tested without DeepSpeed.
"""
from __future__ import annotations

import json
from pathlib import Path

from launcher.config import ConfigError, RunConfig


def resolve_precision(precision: str, has_cuda: bool, has_bf16: bool) -> str:
    """`auto` means bf16 on a GPU that supports it, else fp32 (bf16 on a CPU is ~30x slower)."""
    if precision != "auto":
        return precision
    return "bf16" if has_cuda and has_bf16 else "fp32"


def deepspeed_config(cfg: RunConfig, world_size: int, precision: str, load_universal: bool = False) -> dict:
    """A complete DeepSpeed config dict for `deepspeed.initialize`.

    A user's JSON file (deepspeed.config_file) is the base. Batch sizes, accumulation and clipping come
    from our config, and a file that sets them differently is refused; the optimizer, the precision and
    the ZeRO stage/offload keys of our config replace the file's.
    """
    base: dict = {}
    if cfg.deepspeed.config_file:
        path = Path(cfg.deepspeed.config_file)
        try:
            base = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"deepspeed.config_file: {path} not found") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"deepspeed.config_file: {path} is not valid JSON ({err})") from None
    t = cfg.train
    ours = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation,
        "train_batch_size": t.micro_batch_size * t.gradient_accumulation * world_size,
        "gradient_clipping": cfg.optim.max_grad_norm,
    }
    for key, value in ours.items():
        if key in base and base[key] != value:
            raise ConfigError(f"deepspeed.config_file sets {key} = {base[key]} but the run config gives "
                              f"{value}; remove it from the JSON file (batch sizes come from train.*)")
    if "scheduler" in base:
        raise ConfigError("deepspeed.config_file sets a 'scheduler'; the schedule comes from optim.scheduler "
                          "and optim.warmup_steps, so remove it from the JSON file")
    zero = dict(base.get("zero_optimization", {}))
    zero["stage"] = cfg.deepspeed.zero_stage
    if cfg.deepspeed.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu"}
        if cfg.deepspeed.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    if cfg.deepspeed.zero_stage == 3:
        # Export reads fp32 weights back from the shards; no 16-bit gather at save time is needed.
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", False)
    out = {**base, **ours, "zero_optimization": zero}
    out["optimizer"] = {"type": "AdamW", "params": {
        "lr": cfg.optim.lr, "weight_decay": cfg.optim.weight_decay, "betas": list(cfg.optim.betas),
        # torch's AdamW needs no JIT-compiled op; CPU offload needs DeepSpeed's CPU Adam.
        "torch_adam": cfg.deepspeed.offload != "cpu"}}
    out["bf16"] = {"enabled": precision == "bf16"}
    out["fp16"] = {"enabled": precision == "fp16"}
    if load_universal:  # resuming on another world size from a universal checkpoint
        out["checkpoint"] = {**out.get("checkpoint", {}), "load_universal": True}
    out.setdefault("steps_per_print", 10 ** 9)  # the loop logs; DeepSpeed's own prints are noise
    out.setdefault("wall_clock_breakdown", False)
    return out
