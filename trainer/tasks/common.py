"""Pieces the task modules share by calling them (no base class): bad-row
handling, column checks, label sets and the classification evaluation. Imports torch inside
functions only; never ray.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from trainer.config import ConfigError, RunConfig
from trainer.data import Prepared
from trainer.masking import IGNORE


ROW = "row"  # prepared column: the example's row in its source (0-based)
DROP = "drop"  # column of an encoder's output: "" keeps the row; bad(column, problem); or why it is left out
_BAD = "bad\t"


class NoUsableRows(ConfigError):
    """Every row of a split was left out; `dropped` says why (reason -> rows), for a task to explain."""

    def __init__(self, message: str, dropped: dict) -> None:
        super().__init__(message)
        self.dropped = dropped

    def __reduce__(self):  # rebuilt with its reasons where it crosses a process (a Ray worker's error)
        return type(self), (str(self), self.dropped)


def model_loss(model, batch: dict, impl=None, cfg=None):
    """The training objective most tasks use: the model's own loss on the batch's labels (token
    cross-entropy for causal LMs, cross-entropy over the label ids for classifiers). `model` is the
    DeepSpeed engine (its forward is the model's, with ZeRO's gathering); `batch` is what the task's
    collator made, on the device; `impl` (train.loss_impl resolved) is always standard here: the
    config checks refuse the others for tasks without TaskSpec.chunks_loss."""
    return model(**batch).loss


def bad(column: str, problem: str) -> str:
    """An encoder's DROP value for a bad row: stops the run, or is skipped with data.skip_bad_rows."""
    return f"{_BAD}{column}\t{problem}"


def encode_split(split, cfg: RunConfig, encode: Callable[[dict], dict], inputs: tuple[str, ...],
                 fmt: Optional[str] = None, scratch: Optional[Path] = None) -> Prepared:
    """Run a task's batched `encode` (columns of raw records -> columns of model inputs and DROP,
    one value per row) over a split with `datasets.map` (data.num_proc processes). A bad row raises
    a ConfigError naming file, row and column unless data.skip_bad_rows; rows left out are counted by
    reason. `scratch`: where the Arrow files go (None: in memory)."""
    import pyarrow.compute as pc

    require_rows(split)
    rows = split.rows

    def encode_rows(batch: dict, positions: list[int]) -> dict:
        out = encode(batch)
        out[ROW] = [int(rows[i]) if rows is not None else i for i in positions]
        return out

    big = len(split) >= 2000
    num_proc = cfg.data.num_proc if cfg.data.num_proc > 1 and len(split) >= 1000 * cfg.data.num_proc else None
    files = {} if scratch is None else {"cache_file_name": str(scratch / f"{split.name}-encoded.arrow")}
    table = split.table.map(encode_rows, batched=True, with_indices=True, remove_columns=split.columns,
                            num_proc=num_proc, keep_in_memory=scratch is None, load_from_cache_file=False,
                            desc=f"preparing the {split.name} split" if big else None,
                            new_fingerprint=f"sft-{split.name}-{id(encode)}", **files)
    drop = table.data.column(DROP)
    is_bad = pc.starts_with(drop, _BAD)
    if pc.any(is_bad).as_py() and not cfg.data.skip_bad_rows:
        first = pc.index(is_bad, True).as_py()
        _, column, problem = table[first][DROP].split("\t", 2)
        from trainer.data import describe_row
        raise ConfigError(f"{split.source}, {split.name} split, {describe_row(split.source, table[first][ROW])}, "
                          f"column '{column}': {problem} (set data.skip_bad_rows: true to skip such rows)")
    reasons = pc.if_else(is_bad, "bad rows skipped by data.skip_bad_rows", drop)
    dropped = {r["values"]: r["counts"] for r in pc.value_counts(reasons).to_pylist() if r["values"]}
    if dropped:
        import numpy as np

        keep = np.flatnonzero(pc.equal(drop, "").to_numpy(zero_copy_only=False))
        table = table.select(keep)
    if not len(table):
        raise NoUsableRows(f"{split.source}: no usable row in the {split.name} split "
                           f"({'; '.join(f'{n} {why}' for why, n in dropped.items())})", dropped)
    return Prepared(table.remove_columns([DROP]), inputs, fmt, len(split), dropped)


def require_columns(split, columns: Iterable[tuple[str, str]]) -> None:
    """(column, config key) pairs that must all be present."""
    present = split.columns
    for column, key in columns:
        if column not in present:
            raise ConfigError(f"{split.source}: the {split.name} split has no column '{column}' ({key}); "
                              f"found columns: {', '.join(present) or 'none'}")


def require_rows(split) -> None:
    if not len(split):
        raise ConfigError(f"{split.source}: the {split.name} split is empty")


def label_set(cfg: RunConfig, train, column: str, key: str, values: Callable[[Any], Iterable]) -> list[str]:
    """data.labels, else the data set's ClassLabel names, else every label of the training split
    (`values` turns a cell into its labels); integer ids keep their numbers."""
    if cfg.data.labels:
        return list(cfg.data.labels)
    if column in train.class_names:
        return list(train.class_names[column])
    require_columns(train, [(column, key)])
    found = {v for cell in train.values(column) for v in values(cell)}
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

    `predict(logits, batch, positions)` gives the batch's predictions; `metrics(golds, preds)` the
    scores. The gold answers are the prepared split's "gold" column."""
    import torch.nn.functional as F

    local, loss_sum, count = [], 0.0, 0
    for chunk, batch, logits in shard.batches(prepared):
        target = batch["labels"]
        loss_sum += float(F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), target.reshape(-1),
                                          ignore_index=IGNORE, reduction="sum"))
        count += int((target != IGNORE).sum())
        ids, golds = prepared.column(ROW, chunk), prepared.column("gold", chunk)
        for row, gold, p in zip(ids, golds, predict(logits, batch, chunk)):
            local.append({"id": row, "gold": gold, "predicted": p})
    parts = shard.gather((local, loss_sum, count))
    rows = sorted((r for part in parts for r in part[0]), key=lambda r: r["id"])
    total_loss, total_count = sum(p[1] for p in parts), sum(p[2] for p in parts)
    scores = metrics([r["gold"] for r in rows], [r["predicted"] for r in rows])
    return {"loss": total_loss / max(total_count, 1), "examples": float(len(rows)), **scores}, rows


def evaluate_labels(shard, prepared: Prepared, labels: list[str]) -> tuple[dict, list[dict]]:
    """One label per example (sequence and image classification): accuracy, macro and per-class F1."""
    from trainer.metrics import accuracy, macro_f1, per_class_f1

    def predict(logits, batch, positions):
        return [labels[i] for i in logits.argmax(-1).tolist()]

    def scores(golds, preds):
        return {"accuracy": accuracy(golds, preds), "macro_f1": macro_f1(golds, preds, labels),
                "per_class_f1": per_class_f1(golds, preds, labels)}

    return classify(shard, prepared, predict, scores)
