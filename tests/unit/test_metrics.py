"""Classification and BIO span metrics on hand-made cases."""
import pytest

from trainer.metrics import accuracy, bio_spans, macro_f1, per_class_f1, span_prf


def test_accuracy_and_f1():
    gold, pred = ["a", "a", "b", "c"], ["a", "b", "b", "b"]
    assert accuracy(gold, pred) == 0.5
    f1 = per_class_f1(gold, pred, ["a", "b", "c"])
    assert f1 == pytest.approx({"a": 2 / 3, "b": 0.5, "c": 0.0})
    assert macro_f1(gold, pred, ["a", "b", "c", "unused"]) == pytest.approx((2 / 3 + 0.5) / 3)


def test_bio_spans():
    tags = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "I-ORG", "O"]
    assert bio_spans(tags) == {("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 6), ("ORG", 6, 7)}
    assert bio_spans(["I-PER", "I-PER"]) == {("PER", 0, 2)}  # conlleval: I- without B- opens a span
    assert bio_spans(["B-ARG0", "I-ARG1"]) == {("ARG0", 0, 1), ("ARG1", 1, 2)}


def test_span_prf_needs_exact_type_and_boundaries():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "O"]]
    m = span_prf(gold, pred)  # PER boundary wrong: 2 of 3 predicted right, 2 of 3 gold found
    assert m == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3})
    assert span_prf([["O"]], [["O"]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
