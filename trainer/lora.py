"""LoRA (finetune.mode: lora) on peft: which modules get adapters, wrapping a model, merging for export.

The base model stays frozen; peft adds low-rank adapters to the target modules (finetune.lora.target,
fnmatch patterns over module names; default: every linear layer inside the transformer blocks, found
by module type, so no table of names per model family). A classification head, and the modules of
any finetune.train pattern, train fully (peft's modules_to_save). Works on a meta-device skeleton
too (preflight). Never imports ray.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from fnmatch import fnmatchcase

from trainer.config import ConfigError, FinetuneConfig
from trainer.freezing import Layout

ADAPTER = "default"  # peft's adapter name


@dataclass(frozen=True)
class LoraLayout:
    targets: tuple[str, ...]  # module names (of the unwrapped model) that get adapters
    full: tuple[str, ...]  # module names that train fully (head, finetune.train)

    def describe(self, cfg: FinetuneConfig) -> str:
        kinds = sorted({t.rsplit(".", 1)[-1] for t in self.targets})
        text = f"LoRA r={cfg.lora.r} alpha={cfg.lora.alpha:g} on {len(self.targets)} modules ({', '.join(kinds[:8])}"
        text += " ...)" if len(kinds) > 8 else ")"
        return text + (f"; fully trained: {', '.join(self.full)}" if self.full else "")


def _adaptable(module) -> bool:
    import torch
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, Conv1D))


def lora_layout(model, cfg: FinetuneConfig, layout: Layout) -> LoraLayout:
    """Where adapters go and what trains fully; a ConfigError when a pattern matches nothing."""
    head_modules = sorted({n.rsplit(".", 1)[0] for n in layout.head_names})
    out_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    candidates = [name for name, module in model.named_modules()
                  if _adaptable(module) and module is not out_embeddings
                  and not any(name == h or name.startswith(h + ".") for h in head_modules)]
    if cfg.lora.target:
        targets: list[str] = []
        for i, pattern in enumerate(cfg.lora.target):
            hits = [n for n in candidates if fnmatchcase(n, pattern)]
            if not hits:
                raise ConfigError(f"finetune.lora.target[{i}] = {pattern!r} matches no linear or convolution layer "
                                  f"of the model (they look like {candidates[0]!r} ... {candidates[-1]!r})"
                                  if candidates else f"finetune.lora.target[{i}]: the model has no layer LoRA adapts")
            targets += [n for n in hits if n not in targets]
    else:
        inside = [n for n in candidates if layout.block_prefix and n.startswith(layout.block_prefix)]
        targets = inside or candidates
        if not targets:
            raise ConfigError("finetune.mode: lora: the model has no linear or convolution layer to adapt; "
                              "name them in finetune.lora.target")
    # A classification head is new for the task: it trains fully (a causal LM's head is the vocabulary).
    full = set(head_modules) if out_embeddings is None else set()
    names = [n for n, _ in model.named_parameters()]
    for i, pattern in enumerate(cfg.train):
        hits = {n.rsplit(".", 1)[0] for n in names if fnmatchcase(n, pattern)}
        if not hits:
            raise ConfigError(f"finetune.train[{i}] = {pattern!r} matches no parameter of the model "
                              f"(names look like {names[0]!r} ... {names[-1]!r})")
        full |= hits
    return LoraLayout(tuple(targets), tuple(sorted(full)))


def wrap(model, cfg: FinetuneConfig, layout: Layout):
    """The model with adapters (a peft PeftModel); only the adapters and the fully trained modules
    require gradients."""
    import peft

    found = lora_layout(model, cfg, layout)
    config = peft.LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                             target_modules=list(found.targets), modules_to_save=list(found.full) or None)
    with warnings.catch_warnings():  # peft 0.21 reads a transformers attribute deprecated in 5.x
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return peft.get_peft_model(model, config, adapter_name=ADAPTER)


def trainable_model(model, cfg: FinetuneConfig) -> tuple:
    """The model as it trains under finetune.* (with adapters under lora) and the names of the
    parameters that train; requires_grad is set accordingly."""
    from trainer.freezing import apply_trainable, describe_layout, select_trainable

    layout = describe_layout(model)
    if cfg.mode == "lora":
        model = wrap(model, cfg, layout)
        return model, {n for n, p in model.named_parameters() if p.requires_grad}
    trainable = select_trainable([n for n, _ in model.named_parameters()], cfg, layout)
    apply_trainable(model, trainable)
    return model, trainable
