"""Classification metrics as pure functions: accuracy, per-class and macro F1, BIO span P/R/F1.

Span scoring follows conlleval: a span is (type, start, end); a predicted span counts only when
type and both boundaries match a gold span. An I- tag that does not continue a span of its type
opens a new one (conlleval's lenient reading). Imports only the stdlib.
"""
from __future__ import annotations

from typing import Hashable, Sequence


def accuracy(gold: Sequence[Hashable], pred: Sequence[Hashable]) -> float:
    return sum(g == p for g, p in zip(gold, pred)) / max(len(gold), 1)


def per_class_f1(gold: Sequence[Hashable], pred: Sequence[Hashable], classes: Sequence[Hashable]) -> dict:
    out = {}
    for c in classes:
        tp = sum(g == c and p == c for g, p in zip(gold, pred))
        fp = sum(g != c and p == c for g, p in zip(gold, pred))
        fn = sum(g == c and p != c for g, p in zip(gold, pred))
        out[c] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return out


def macro_f1(gold: Sequence[Hashable], pred: Sequence[Hashable], classes: Sequence[Hashable]) -> float:
    """Mean F1 over the classes that occur in gold or predictions (sklearn's labels=None behaviour)."""
    present = [c for c in classes if c in set(gold) | set(pred)]
    scores = per_class_f1(gold, pred, present)
    return sum(scores.values()) / max(len(scores), 1)


def bio_spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """(type, start, end-exclusive) spans of a BIO (or IOB1-lenient) tag sequence."""
    spans, kind, start = set(), None, 0
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, label = tag.partition("-")
        continues = prefix == "I" and kind == label
        if kind is not None and not continues:
            spans.add((kind, start, i))
            kind = None
        if prefix == "B" or (prefix == "I" and not continues):
            kind, start = label, i
    return spans


def span_prf(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict[str, float]:
    """Micro precision/recall/F1 over BIO spans of many sentences."""
    tp = n_pred = n_gold = 0
    for g, p in zip(gold, pred):
        gs, ps = bio_spans(g), bio_spans(p)
        tp, n_pred, n_gold = tp + len(gs & ps), n_pred + len(ps), n_gold + len(gs)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}
