"""Selective freezing: which parameters train, as pure functions over parameter names.

`select_trainable` decides; `apply_trainable` is the only function that touches parameters.
`describe_layout` reads a model's block structure (it works on a meta-device skeleton).
Imports only the stdlib at module level; torch is imported inside the functions that need it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Sequence

from trainer.config import ConfigError, FinetuneConfig


@dataclass(frozen=True)
class Layout:
    """Where the transformer blocks, embeddings and output head sit among the parameter names."""
    block_prefix: str  # e.g. "model.layers." ; a block's parameters are "<prefix><i>.<rest>"
    num_blocks: int
    embedding_names: frozenset[str]
    head_names: frozenset[str]  # empty when the head is tied to the input embeddings
    tied_head: bool = False


def block_index(name: str, layout: Layout) -> int | None:
    if not name.startswith(layout.block_prefix):
        return None
    head = name[len(layout.block_prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def select_trainable(names: Sequence[str], cfg: FinetuneConfig, layout: Layout) -> set[str]:
    """The parameter names that train under `cfg`. Raises ConfigError for a rule that selects nothing."""
    if cfg.mode == "global":
        return set(names)

    def matching(pattern: str, key: str) -> set[str]:
        hits = {n for n in names if fnmatchcase(n, pattern)}
        if not hits:
            raise ConfigError(f"{key} = {pattern!r} matches no parameter of the model "
                              f"(names look like {names[0]!r} ... {names[-1]!r})")
        return hits

    selected: set[str] = set()
    for i, pattern in enumerate(cfg.train):
        selected |= matching(pattern, f"finetune.train[{i}]")
    if cfg.train_last_layers is not None:
        k = cfg.train_last_layers
        if k > layout.num_blocks:
            raise ConfigError(f"finetune.train_last_layers = {k} but the model has only {layout.num_blocks} "
                              f"transformer blocks ({layout.block_prefix}0..{layout.num_blocks - 1})")
        first = layout.num_blocks - k
        selected |= {n for n in names if (b := block_index(n, layout)) is not None and b >= first}
    if not cfg.train and cfg.train_last_layers is None:
        selected = set(names)  # only freeze/embedding/head rules: start from everything

    head = layout.embedding_names if layout.tied_head else layout.head_names
    for flag, group, key in ((cfg.train_embeddings, layout.embedding_names, "train_embeddings"),
                             (cfg.train_head, head, "train_head")):
        if flag is None:
            continue
        if not group:
            raise ConfigError(f"finetune.{key} is set but the model has no such parameters")
        selected = selected | group if flag else selected - group
    for i, pattern in enumerate(cfg.freeze):
        selected -= matching(pattern, f"finetune.freeze[{i}]")
    if not selected:
        raise ConfigError("the finetune rules leave nothing to train: every parameter is frozen "
                          "(check finetune.freeze and finetune.train)")
    return selected


def summarize(names_and_sizes: Sequence[tuple[str, int]], trainable: set[str], layout: Layout) -> str:
    """One compact line: trainable/total counts, then which blocks and other groups train."""
    total = sum(s for _, s in names_and_sizes)
    n_train = sum(s for n, s in names_and_sizes if n in trainable)
    per_block: dict[int, list[bool]] = {}
    other_train = []
    for name, _ in names_and_sizes:
        b = block_index(name, layout)
        if b is not None:
            per_block.setdefault(b, []).append(name in trainable)
        elif name in trainable:
            other_train.append(name)
    marks = "".join("T" if all(v) else ("p" if any(v) else ".") for _, v in sorted(per_block.items()))
    pct = 100.0 * n_train / max(total, 1)
    parts = [f"trainable {n_train:,} / {total:,} parameters ({pct:.2f}%)"]
    if marks:
        parts.append(f"blocks [{marks}] (T trains, p partly, . frozen)")
    if other_train:
        parts.append("also training: " + ", ".join(_compact(other_train)))
    return "; ".join(parts)


def _compact(names: list[str], limit: int = 6) -> list[str]:
    return names[:limit] + ([f"... {len(names) - limit} more"] if len(names) > limit else [])


_BLOCK_LIST = re.compile(r"^(.*\.)?(layers|layer|h|blocks|block)$")


def describe_layout(model) -> Layout:
    """Find the block list, embeddings and head of a transformers model (meta-device is fine)."""
    import torch

    best: tuple[str, int] = ("", 0)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and _BLOCK_LIST.match(name) and len(module) > best[1]:
            best = (name + ".", len(module))
    embedding_names = {f"{mname}.{pname}" if mname else pname
                       for mname, module in model.named_modules() if isinstance(module, torch.nn.Embedding)
                       for pname, _ in module.named_parameters(recurse=False)}
    head_names: set[str] = set()
    tied = False
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None:
        inp = model.get_input_embeddings()
        tied = inp is not None and out.weight is inp.weight
        if not tied:
            ids = {id(p) for p in out.parameters()}
            head_names = {n for n, p in model.named_parameters() if id(p) in ids}
    elif getattr(model, "base_model_prefix", ""):
        # A task head (classifier) is whatever lies outside the pretrained base model.
        prefix = model.base_model_prefix + "."
        head_names = {n for n, _ in model.named_parameters() if not n.startswith(prefix)}
    return Layout(best[0], best[1], frozenset(embedding_names), frozenset(head_names), tied)


def apply_trainable(model, trainable: set[str]) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
