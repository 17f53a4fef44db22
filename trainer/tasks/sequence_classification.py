"""sequence_classification: a text (and an optional text pair) -> one label.

The module to copy for a new task: columns, label set, preparation, collator, throughput unit and
evaluation, each a plain function. Metrics: loss, accuracy, macro F1 and per-class F1 over the
gathered predictions. Never imports ray.
"""
from __future__ import annotations

from trainer.config import DataConfig, RunConfig
from trainer.tasks.common import BadRows, Prepared, evaluate_labels, label_id, label_set, require_columns, require_rows, \
    unknown_label

AUTO_MODEL = "AutoModelForSequenceClassification"
PROCESSOR = "tokenizer"
UNIT = "tokens"


def check_columns(split, d: DataConfig) -> None:
    require_columns(split, [(d.text_column, "data.text_column"), (d.label_column, "data.label_column")])


def label_names(cfg: RunConfig, train) -> list[str]:
    return label_set(cfg, train, cfg.data.label_column, "data.label_column", lambda value: [value])


def prepare(split, cfg: RunConfig, tokenizer, labels: list[str]) -> Prepared:
    d = cfg.data
    require_rows(split)
    check_columns(split, d)
    rows, out = BadRows(split, d.skip_bad_rows), Prepared([])
    has_pair = d.text_pair_column in split.columns
    for i, r in enumerate(split.records):
        text, pair = r[d.text_column], r[d.text_pair_column] if has_pair else None
        label = label_id(r[d.label_column], labels)
        if not isinstance(text, str) or not text.strip():
            rows.bad(i, d.text_column, f"empty or missing text ({text!r})")
        elif label is None:
            rows.bad(i, d.label_column, unknown_label(r[d.label_column], labels))
        else:
            out.add({**tokenizer(text, pair, truncation=True, max_length=d.max_length), "labels": label},
                    split.row(i), labels[label])
    out.dropped = rows.skipped
    return out


def collator(tokenizer):
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer, return_tensors="pt")


def count(batch: dict) -> int:
    return int(batch["attention_mask"].sum())


evaluate = evaluate_labels  # loss, accuracy, macro F1, per-class F1 over gathered predictions
