"""Consolidate a sharded DeepSpeed checkpoint into a plain transformers model folder.

Uses DeepSpeed's own zero_to_fp32 reader (ZeRO 1-3); stage 0 has no ZeRO files and stores the whole
module in one file. Never imports ray.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from trainer.config import RunConfig
from trainer.checkpoints import TAG
from trainer.lora import trainable_model
from trainer.model import build_model, prepare_pretrained


def consolidated_state_dict(checkpoint: Path, zero_stage: int) -> dict:
    import torch

    if zero_stage == 0:
        states = torch.load(checkpoint / TAG / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return states["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=TAG)


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def export_dtype(cfg: RunConfig, trained_in: str) -> str:
    """export.dtype, where auto is the precision the run trained in (fp32, bf16 or fp16)."""
    return trained_in if cfg.export.dtype == "auto" else cfg.export.dtype


def export_model(cfg: RunConfig, checkpoint: Path, target: Path, processor, labels: list[str],
                 cache_dir: str, dtype: str = "fp32") -> None:
    """Write safetensors weights in `dtype` (fp32 / bf16 / fp16), config (with id2label for
    classifiers) and the tokenizer or image processor, loadable with the task's AutoModelFor... and
    usable in a transformers pipeline."""
    import torch

    torch.manual_seed(cfg.seed)  # an inline architecture's frozen weights come from the seed
    model = build_model(cfg.model, prepare_pretrained(cfg.model, cache_dir), labels)
    model, _ = trainable_model(model, cfg.finetune)  # with LoRA: the adapters, named as in the checkpoint
    state = consolidated_state_dict(checkpoint, cfg.deepspeed.zero_stage)
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"the checkpoint holds parameters the model lacks: {result.unexpected_keys[:5]}")
    model.to(getattr(torch, DTYPES[dtype]))
    if cfg.finetune.mode == "lora":
        if cfg.export.lora in ("adapter", "both"):  # peft's format: PeftModel.from_pretrained(base, path)
            model.save_pretrained(adapter_dir(target), safe_serialization=True)
        if cfg.export.lora == "adapter":
            return
        model = model.merge_and_unload()  # a plain transformers model, no peft needed to load it
    # Staged, then renamed into place: an export cut short (a full disk, a kill) never leaves a
    # final_model/ that looks whole.
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        model.save_pretrained(staging, safe_serialization=True)
        if cfg.data.chat_template:  # the template the data was rendered with goes with the tokenizer
            from trainer.chat import TEMPLATES

            processor.chat_template = TEMPLATES.get(cfg.data.chat_template, cfg.data.chat_template)
        processor.save_pretrained(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # give back what it took of a full disk
        raise
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def adapter_dir(final_model: Path) -> Path:
    """Where export.lora: adapter | both writes the LoRA adapter: beside final_model/."""
    return final_model.parent / "final_adapter"
