"""What differs between tasks: label sets, example preparation, collators, and evaluation outputs.

causal_lm keeps its SFT path (trainer/data.py); the classification tasks are prepared here:
sequence_classification (text [+ text pair] -> label), token_classification (words -> one tag per
word, first sub-word labelled; SRL marks the predicate by passing its word as the second segment),
image_classification (image -> label). Never imports ray.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from launcher.config import ConfigError, RunConfig
from trainer.masking import IGNORE

CLASSIFICATION = ("sequence_classification", "token_classification", "image_classification")


@dataclass
class Prepared:
    """Model inputs, and per example its position in the split and its gold answer."""
    examples: list[dict]
    ids: list[int] = field(default_factory=list)
    golds: list[Any] = field(default_factory=list)
    skipped: int = 0
    words: list[list[int]] = field(default_factory=list)  # token classification: word of each labelled token


class _Rows:
    """Raises a ConfigError naming file, row and column, or skips and counts (data.skip_bad_rows)."""

    def __init__(self, split, skip: bool):
        self.split, self.skip, self.skipped = split, skip, 0

    def bad(self, row: int, column: str, problem: str) -> None:
        if self.skip:
            self.skipped += 1
            return
        raise ConfigError(f"{self.split.source}, {self.split.name} split, row {row}, column '{column}': {problem} "
                          f"(set data.skip_bad_rows: true to skip such rows)")


def require_columns(split, columns: list[str], keys: list[str]) -> None:
    present = list(split.records[0].keys()) if split.records else []
    for column, key in zip(columns, keys):
        if column not in present:
            raise ConfigError(f"{split.source}: the {split.name} split has no column '{column}' ({key}); "
                              f"found columns: {', '.join(present) or 'none'}")


def label_names(cfg: RunConfig, train_split) -> list[str]:
    """The label set: data.labels, else the data set's ClassLabel names, else every label of the
    training split (integer ids as their numbers)."""
    d = cfg.data
    if d.labels:
        return list(d.labels)
    column = d.tags_column if cfg.model.task == "token_classification" else d.label_column
    if column in train_split.class_names:
        return list(train_split.class_names[column])
    if cfg.model.task == "token_classification":
        require_columns(train_split, [d.tags_column], ["data.tags_column"])
        values = {t for r in train_split.records if isinstance(r[d.tags_column], list) for t in r[d.tags_column]}
    else:
        require_columns(train_split, [d.label_column], ["data.label_column"])
        values = {r[d.label_column] for r in train_split.records}
    values.discard(None)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return [str(i) for i in range(max(values) + 1)] if values else []
    return sorted(str(v) for v in values)


def _label_id(value, labels: list[str]) -> Optional[int]:
    """A label given by name, or by id into the label set (other scalars, like true or 1.0, by their text)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if str(value) in labels:
            return labels.index(str(value))
        return value if 0 <= value < len(labels) else None
    if isinstance(value, (str, bool, float)) and str(value) in labels:
        return labels.index(str(value))
    return None


def prepare(cfg: RunConfig, split, processor, labels: list[str]) -> Prepared:
    task, d = cfg.model.task, cfg.data
    rows = _Rows(split, d.skip_bad_rows)
    if not split.records:
        raise ConfigError(f"{split.source}: the {split.name} split is empty")
    out = Prepared([])
    if task == "sequence_classification":
        require_columns(split, [d.text_column, d.label_column], ["data.text_column", "data.label_column"])
        has_pair = d.text_pair_column in split.records[0]
        for i, r in enumerate(split.records):
            text, pair = r[d.text_column], r[d.text_pair_column] if has_pair else None
            label = _label_id(r[d.label_column], labels)
            if not isinstance(text, str) or not text.strip():
                rows.bad(i, d.text_column, f"empty or missing text ({text!r})")
                continue
            if label is None:
                rows.bad(i, d.label_column, f"label {r[d.label_column]!r} is not in the label set "
                                            f"{labels[:10]}{' ...' if len(labels) > 10 else ''} taken from the "
                                            f"training split (or data.labels)")
                continue
            enc = processor(text, pair, truncation=True, max_length=d.max_length)
            out.examples.append({**enc, "labels": label})
            out.ids.append(i)
            out.golds.append(labels[label])
    elif task == "token_classification":
        require_columns(split, [d.tokens_column, d.tags_column], ["data.tokens_column", "data.tags_column"])
        has_predicate = d.predicate_column in split.records[0]
        for i, r in enumerate(split.records):
            words, tags = r[d.tokens_column], r[d.tags_column]
            if not isinstance(words, list) or not words or not all(isinstance(w, str) and w for w in words):
                rows.bad(i, d.tokens_column, "expected a non-empty list of words")
                continue
            if not isinstance(tags, list) or len(tags) != len(words):
                rows.bad(i, d.tags_column, f"{len(tags) if isinstance(tags, list) else 'no'} tags for "
                                           f"{len(words)} words; expected one tag per word")
                continue
            ids = [_label_id(t, labels) for t in tags]
            if None in ids:
                rows.bad(i, d.tags_column, f"tag {tags[ids.index(None)]!r} is not in the tag set taken from "
                                           f"the training split (or data.labels)")
                continue
            pair = None
            if has_predicate:
                p = r[d.predicate_column]
                if not isinstance(p, int) or not 0 <= p < len(words):
                    rows.bad(i, d.predicate_column, f"predicate index {p!r} is not a word position 0..{len(words) - 1}")
                    continue
                pair = [words[p]]
            enc = processor(words, pair, is_split_into_words=True, truncation="only_first" if pair else True,
                            max_length=d.max_length)
            aligned = align_labels(enc.word_ids(), enc.sequence_ids(), ids)
            out.examples.append({**enc, "labels": aligned})
            out.ids.append(i)
            out.golds.append([labels[t] for t in ids])
            out.words.append([w for w, label in zip(enc.word_ids(), aligned) if label != IGNORE])
    elif task == "image_classification":
        require_columns(split, [d.image_column, d.label_column], ["data.image_column", "data.label_column"])
        base = Path(split.source).parent if Path(split.source).exists() else Path(".")
        for i, r in enumerate(split.records):
            label = _label_id(r[d.label_column], labels)
            if label is None:
                rows.bad(i, d.label_column, f"label {r[d.label_column]!r} is not in the label set taken from the "
                                            f"training split (or data.labels)")
                continue
            try:
                image = load_image(r[d.image_column], base)
            except Exception as err:  # PIL raises many kinds for a broken file
                rows.bad(i, d.image_column, f"unreadable image ({type(err).__name__}: {str(err)[:120]})")
                continue
            pixels = processor(images=image, return_tensors="pt")["pixel_values"][0]
            out.examples.append({"pixel_values": pixels, "labels": label})
            out.ids.append(i)
            out.golds.append(labels[label])
    else:
        raise ValueError(f"not a classification task: {task}")
    out.skipped = rows.skipped
    if not out.examples:
        raise ConfigError(f"{split.source}: no usable row in the {split.name} split")
    return out


def align_labels(word_ids: list, sequence_ids: list, tag_ids: list[int]) -> list[int]:
    """One label per token: the first sub-word of each word of the first segment; IGNORE elsewhere."""
    labels, previous = [], None
    for word, seq in zip(word_ids, sequence_ids):
        first = word is not None and seq == 0 and word != previous
        labels.append(tag_ids[word] if first else IGNORE)
        if seq == 0:
            previous = word
    return labels


def load_image(value, base: Path):
    """A PIL image from what a data set holds: a PIL image, a path, {'bytes'|'path': ...}, or pixels."""
    from PIL import Image

    if hasattr(value, "convert"):
        image = value
    elif isinstance(value, str):
        path = Path(value) if Path(value).is_absolute() else base / value
        image = Image.open(path)
    elif isinstance(value, dict) and value.get("bytes"):
        image = Image.open(io.BytesIO(value["bytes"]))
    elif isinstance(value, dict) and value.get("path"):
        image = Image.open(base / value["path"])
    elif isinstance(value, list):
        import numpy as np

        image = Image.fromarray(np.asarray(value, dtype="uint8"))
    else:
        raise ValueError(f"cannot make an image of a {type(value).__name__}")
    image.load()
    return image.convert("RGB")


def collator(task: str, processor):
    if task == "causal_lm":
        from transformers import DataCollatorForSeq2Seq
        return DataCollatorForSeq2Seq(processor, padding=True, label_pad_token_id=IGNORE, return_tensors="pt")
    if task == "sequence_classification":
        from transformers import DataCollatorWithPadding
        return DataCollatorWithPadding(processor, return_tensors="pt")
    if task == "token_classification":
        from transformers import DataCollatorForTokenClassification
        return DataCollatorForTokenClassification(processor, label_pad_token_id=IGNORE, return_tensors="pt")
    from transformers import default_data_collator
    return default_data_collator


def predictions(task: str, logits, batch, labels: list[str], words: list[tuple[int, list[int]]]) -> list:
    """Predicted label names (or, per word, tag names) of a batch. For token classification `words`
    gives, per example, its word count and the word of each labelled token; words without a
    labelled token (cut off by max_length, or tokenized to nothing) are predicted O."""
    if task == "token_classification":
        out = []
        best = logits.argmax(-1)
        for row, (n_words, word_of) in enumerate(words):
            tags = ["O"] * n_words
            for word, tag in zip(word_of, best[row][batch["labels"][row] != IGNORE].tolist()):
                tags[word] = labels[tag]
            out.append(tags)
        return out
    return [labels[i] for i in logits.argmax(-1).tolist()]
