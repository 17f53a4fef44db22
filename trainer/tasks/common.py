"""Pieces the task modules share by calling them (no base class): prepared examples, bad-row
handling, column checks, label sets and the classification evaluation. Imports torch inside
functions only; never ray.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from trainer.config import ConfigError, RunConfig
from trainer.masking import IGNORE


@dataclass
class Prepared:
    """A split as model inputs, with each example's source row and gold answer."""
    examples: list[dict]
    ids: list[int] = field(default_factory=list)  # the example's row in its source file (0-based)
    golds: list[Any] = field(default_factory=list)
    notes: list[Any] = field(default_factory=list)  # per example, what the task's evaluation needs besides
    dropped: int = 0  # rows left out (see why_dropped)
    why_dropped: str = "bad rows skipped by data.skip_bad_rows"

    def add(self, example: dict, row: int, gold: Any = None, note: Any = None) -> None:
        self.examples.append(example)
        self.ids.append(row)
        self.golds.append(gold)
        if note is not None:
            self.notes.append(note)


class BadRows:
    """Raises a ConfigError naming file, row and column, or skips and counts (data.skip_bad_rows)."""

    def __init__(self, split, skip: bool):
        self.split, self.skip, self.skipped = split, skip, 0

    def bad(self, i: int, column: str, problem: str) -> None:
        if self.skip:
            self.skipped += 1
            return
        raise ConfigError(f"{self.split.source}, {self.split.name} split, {self.split.where(i)}, column '{column}': "
                          f"{problem} (set data.skip_bad_rows: true to skip such rows)")


def require_columns(split, columns: Iterable[tuple[str, str]]) -> None:
    """(column, config key) pairs that must all be present."""
    present = split.columns
    for column, key in columns:
        if column not in present:
            raise ConfigError(f"{split.source}: the {split.name} split has no column '{column}' ({key}); "
                              f"found columns: {', '.join(present) or 'none'}")


def require_rows(split) -> None:
    if not split.records:
        raise ConfigError(f"{split.source}: the {split.name} split is empty")


def label_set(cfg: RunConfig, train, column: str, key: str, values: Callable[[Any], Iterable]) -> list[str]:
    """data.labels, else the data set's ClassLabel names, else every label of the training split
    (`values` turns a cell into its labels); integer ids keep their numbers."""
    if cfg.data.labels:
        return list(cfg.data.labels)
    if column in train.class_names:
        return list(train.class_names[column])
    require_columns(train, [(column, key)])
    found = {v for r in train.records for v in values(r[column])}
    found.discard(None)
    if found and all(isinstance(v, int) and not isinstance(v, bool) for v in found):
        return [str(i) for i in range(max(found) + 1)]
    kinds = {type(v).__name__ for v in found}
    if len(kinds) > 1 and "str" in kinds:
        raise ConfigError(f"{train.source}: column '{column}' ({key}) mixes label names and numbers "
                          f"({', '.join(sorted(kinds))}); use one kind throughout, or list the labels in data.labels")
    return sorted(str(v) for v in found)


def label_id(value, labels: list[str]) -> int | None:
    """A label given by name, or by id into the label set (other scalars, like true or 1.0, by their text)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if str(value) in labels:
            return labels.index(str(value))
        return value if 0 <= value < len(labels) else None
    if isinstance(value, (str, bool, float)) and str(value) in labels:
        return labels.index(str(value))
    return None


def unknown_label(value, labels: list[str]) -> str:
    shown = f"{labels[:10]}{' ...' if len(labels) > 10 else ''}"
    return f"label {value!r} is not in the label set {shown} taken from the training split (or data.labels)"


def classify(shard, prepared: Prepared, predict: Callable, metrics: Callable) -> tuple[dict, list[dict]]:
    """Loss, task metrics and per-example predictions over a whole split. Each rank predicts its
    shard; the predictions are gathered by example id, so an uneven split counts every example once.

    `predict(logits, batch, notes)` gives the batch's predictions; `metrics(golds, preds)` the scores."""
    import torch.nn.functional as F

    local, loss_sum, count = [], 0.0, 0
    for chunk, batch, logits in shard.batches(prepared.examples):
        target = batch["labels"]
        loss_sum += float(F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), target.reshape(-1),
                                          ignore_index=IGNORE, reduction="sum"))
        count += int((target != IGNORE).sum())
        notes = [prepared.notes[i] for i in chunk] if prepared.notes else [None] * len(chunk)
        for i, p in zip(chunk, predict(logits, batch, notes)):
            local.append({"id": prepared.ids[i], "gold": prepared.golds[i], "predicted": p})
    parts = shard.gather((local, loss_sum, count))
    rows = sorted((r for part in parts for r in part[0]), key=lambda r: r["id"])
    total_loss, total_count = sum(p[1] for p in parts), sum(p[2] for p in parts)
    scores = metrics([r["gold"] for r in rows], [r["predicted"] for r in rows])
    return {"loss": total_loss / max(total_count, 1), "examples": float(len(rows)), **scores}, rows


def evaluate_labels(shard, prepared: Prepared, labels: list[str]) -> tuple[dict, list[dict]]:
    """One label per example (sequence and image classification): accuracy, macro and per-class F1."""
    from trainer.metrics import accuracy, macro_f1, per_class_f1

    def predict(logits, batch, notes):
        return [labels[i] for i in logits.argmax(-1).tolist()]

    def scores(golds, preds):
        return {"accuracy": accuracy(golds, preds), "macro_f1": macro_f1(golds, preds, labels),
                "per_class_f1": per_class_f1(golds, preds, labels)}

    return classify(shard, prepared, predict, scores)
