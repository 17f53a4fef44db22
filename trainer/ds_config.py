"""The DeepSpeed config, derived from ours: the only source of batch sizes and accumulation steps.

Pure: stdlib + our config only, so it is unit-tested without DeepSpeed.
"""
from __future__ import annotations

import json
from pathlib import Path

from trainer import schedule
from trainer.config import ConfigError, RunConfig


def resolve_precision(precision: str, has_cuda: bool, has_bf16: bool) -> str:
    """`auto` means bf16 on a GPU that supports it, else fp32 (bf16 on a CPU is ~30x slower)."""
    if precision != "auto":
        return precision
    return "bf16" if has_cuda and has_bf16 else "fp32"


def read_user_config(path: Path) -> dict:
    try:
        base = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"deepspeed.config_file: {path} not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"deepspeed.config_file: cannot read {path} ({err})") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"deepspeed.config_file: {path} is not valid JSON ({err})") from None
    if not isinstance(base, dict):
        raise ConfigError(f"deepspeed.config_file: {path} must hold a JSON object, got {type(base).__name__}")
    if not isinstance(base.get("zero_optimization", {}), dict):
        raise ConfigError(f"deepspeed.config_file: {path}: zero_optimization must be an object")
    return base


def deepspeed_config(cfg: RunConfig, world_size: int, precision: str, load_universal: bool = False,
                     hidden_size: int | None = None) -> dict:
    """A complete DeepSpeed config dict for `deepspeed.initialize`.

    A user's JSON file (deepspeed.config_file) is the base for everything else (ZeRO tuning, comms,
    activation settings). What our config owns (batch sizes, accumulation, clipping, the optimizer,
    the schedule, the precision, the ZeRO stage) the file may not set otherwise: it is refused, as
    preflight calls this too. The offload keys of deepspeed.offload replace the file's.
    """
    base: dict = {}
    if cfg.deepspeed.config_file:
        base = read_user_config(Path(cfg.deepspeed.config_file))
        stage = base.get("zero_optimization", {}).get("stage", cfg.deepspeed.zero_stage)
        if stage != cfg.deepspeed.zero_stage:
            raise ConfigError(f"deepspeed.config_file {cfg.deepspeed.config_file} sets zero_optimization.stage = "
                              f"{stage} but deepspeed.zero_stage is {cfg.deepspeed.zero_stage}; remove it from the "
                              f"JSON file (the stage comes from deepspeed.zero_stage)")
        for key, owner in (("optimizer", "optim.*"), ("scheduler", "optim.scheduler and optim.warmup_*"),
                           ("bf16", "deepspeed.precision"), ("fp16", "deepspeed.precision")):
            if key in base:
                raise ConfigError(f"deepspeed.config_file {cfg.deepspeed.config_file} sets '{key}'; it comes from "
                                  f"{owner}, so remove it from the JSON file")
    t = cfg.train
    accumulation = schedule.accumulation(cfg.scaling, t, world_size)  # an elastic run keeps its global batch
    ours = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": t.micro_batch_size * accumulation * world_size,
        "gradient_clipping": cfg.optim.max_grad_norm,
    }
    for key, value in ours.items():
        if key in base and base[key] != value:
            raise ConfigError(f"deepspeed.config_file sets {key} = {base[key]} but the run config gives "
                              f"{value}; remove it from the JSON file (batch sizes come from train.*)")
    zero = dict(base.get("zero_optimization", {}))
    zero["stage"] = cfg.deepspeed.zero_stage
    if cfg.deepspeed.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu"}
        if cfg.deepspeed.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    if cfg.deepspeed.zero_stage == 3:
        # Export reads fp32 weights back from the shards; no 16-bit gather at save time is needed.
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", False)
    if hidden_size and cfg.deepspeed.zero_stage > 0:
        # DeepSpeed's bucket defaults (5e8 elements: 2 GB in fp32) are sized for large models; buckets
        # in proportion to the model (what HF Trainer's "auto" chooses) keep a small model small.
        # A value in the user's JSON wins.
        zero.setdefault("reduce_bucket_size", hidden_size * hidden_size)
        zero.setdefault("allgather_bucket_size", hidden_size * hidden_size)
        if cfg.deepspeed.zero_stage == 3:
            zero.setdefault("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size))
            zero.setdefault("stage3_param_persistence_threshold", 10 * hidden_size)
            # DeepSpeed keeps a gathered weight alive while it is used again within 1e9 elements, i.e.
            # the whole forward pass of any model this size, until backward: the full model sits
            # gathered on every rank. About one transformer block (12 hidden²) keeps only what is in use.
            zero.setdefault("stage3_max_live_parameters", 12 * hidden_size * hidden_size)
            zero.setdefault("stage3_max_reuse_distance", 12 * hidden_size * hidden_size)
    out = {**base, **ours, "zero_optimization": zero}
    out["optimizer"] = {"type": "AdamW", "params": {
        "lr": cfg.optim.lr, "weight_decay": cfg.optim.weight_decay, "betas": list(cfg.optim.betas),
        # torch's AdamW needs no JIT-compiled op; CPU offload needs DeepSpeed's CPU Adam.
        "torch_adam": cfg.deepspeed.offload != "cpu"}}
    if cfg.deepspeed.offload != "cpu":
        # One kernel per update: the unfused AdamW makes temporaries the size of what it updates, and
        # ZeRO hands it one flat partition (SmolLM2-135M, ZeRO-3, 2 workers: the step peaked 0.5 GB higher).
        out["optimizer"]["params"]["fused"] = True
    out["bf16"] = {"enabled": precision == "bf16"}
    out["fp16"] = {"enabled": precision == "fp16"}
    if load_universal:  # resuming on another world size from a universal checkpoint
        out["checkpoint"] = {**out.get("checkpoint", {}), "load_universal": True}
    out.setdefault("steps_per_print", 10 ** 9)  # the loop logs; DeepSpeed's own prints are noise
    out.setdefault("wall_clock_breakdown", False)
    return out


def weight_width(precision: str) -> int:
    """Bytes per weight in a run's precision: 2 in bf16 or fp16, else 4 (fp32)."""
    return 2 if precision in ("bf16", "fp16") else 4


def model_state_bytes(total: int, trainable: int, stage: int, world_size: int, precision: str) -> dict[str, int]:
    """Bytes of model states one worker holds, counted as DeepSpeed's ZeRO papers and estimators do:
    weights (all parameters), gradients and Adam states (trainable ones; in bf16/fp16 with an fp32
    master copy), each divided across the ranks from the stage that partitions it (optimizer states
    from 1, gradients from 2, weights at 3). Activations and buffers come on top."""
    mixed = precision in ("bf16", "fp16")
    width = weight_width(precision)

    def share(n_bytes: float, from_stage: int) -> int:
        return int(n_bytes / world_size) if stage >= from_stage else int(n_bytes)

    return {"weights": share(width * total, 3), "gradients": share(width * trainable, 2),
            "optimizer": share((12 if mixed else 8) * trainable, 1)}


def test_phase_bytes(total: int, trainable: int, stage: int, world_size: int, precision: str,
                     gathered: bool) -> dict[str, int]:
    """Bytes one worker holds in the test evaluation: the test engine's weights and its fp32 master
    copy of the trainable ones (no gradients, no Adam moments: it takes no step), shared as in
    training; under ZeRO-3 with `gathered` the whole model too, gathered for the passes."""
    width = weight_width(precision)
    weights = int(width * total / world_size) if stage >= 3 else width * total
    masters = 4 * trainable if stage >= 1 or precision in ("bf16", "fp16") else 0
    out = {"weights": weights, "masters": int(masters / world_size) if stage >= 1 else masters}
    if stage >= 3 and gathered:
        out["gathered"] = width * total - weights
    return out


def export_bytes(total: int, largest: int, streamed: bool, dtype_width: int) -> int:
    """Bytes rank 0's export holds once the test engine is released: streamed, the largest tensor
    read in fp32 and, unless fp32 is the export's dtype, its converted copy (trainer/export.py); built
    (peft's adapter folder, export.lora: adapter | both), the whole model in fp32."""
    return (4 + (dtype_width if dtype_width != 4 else 0)) * largest if streamed else 4 * total
