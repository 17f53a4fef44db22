"""sequence_classification: a text (and an optional text pair) -> one label.

The module to copy for a new task: columns, label set, preparation, collator, throughput unit and
evaluation, each a plain function. Metrics: loss, accuracy, macro F1 and per-class F1 over the
gathered predictions. Never imports ray.
"""
from __future__ import annotations

from trainer.config import DataConfig, RunConfig
from trainer.data import Prepared
from trainer.tasks.common import DROP, bad, encode_split, evaluate_labels, label_id, label_set, model_loss, \
    require_columns, require_rows, unknown_label

loss = model_loss  # the training objective (trainer/tasks/common.py)


def check_columns(split, d: DataConfig) -> None:
    require_columns(split, [(d.text_column, "data.text_column"), (d.label_column, "data.label_column")])


def label_names(cfg: RunConfig, train) -> list[str]:
    return label_set(cfg, train, cfg.data.label_column, "data.label_column", lambda value: [value])


def prepare(split, cfg: RunConfig, tokenizer, labels: list[str], scratch=None) -> Prepared:
    """Token ids, the label id, and the gold label name per row."""
    d = cfg.data
    require_rows(split)
    check_columns(split, d)
    pair_column = d.text_pair_column if d.text_pair_column in split.columns else None

    def encode(batch: dict) -> dict:
        texts, pairs, ids, drops = [], [], [], []
        for i, (text, value) in enumerate(zip(batch[d.text_column], batch[d.label_column])):
            label = label_id(value, labels)
            pair = batch[pair_column][i] if pair_column else None
            drop = ""
            if not isinstance(text, str) or not text.strip():
                drop, text = bad(d.text_column, f"empty or missing text ({text!r})"), ""
            elif label is None:
                drop = bad(d.label_column, unknown_label(value, labels))
            texts.append(text)
            pairs.append(pair if isinstance(pair, str) else "")
            ids.append(label if label is not None else -1)
            drops.append(drop)
        enc = tokenizer(texts, pairs if pair_column else None, truncation=True, max_length=d.max_length)
        return {**enc, "labels": ids, "gold": [labels[i] if i >= 0 else "" for i in ids], DROP: drops}

    return encode_split(split, cfg, encode, (*tokenizer.model_input_names, "labels"), scratch=scratch)


def collator(tokenizer):
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer, return_tensors="pt")


def count(examples: list[dict]) -> int:
    return sum(len(e["input_ids"]) for e in examples)


evaluate = evaluate_labels  # loss, accuracy, macro F1, per-class F1 over gathered predictions
