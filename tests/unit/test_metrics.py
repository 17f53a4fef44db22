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


@pytest.mark.parametrize("seed", range(20))
def test_accuracy_and_f1_agree_with_scikit_learn_on_random_labels(seed):
    import random

    from sklearn.metrics import accuracy_score, f1_score

    rng = random.Random(seed)
    classes = ["a", "b", "c", "d", "e"][:rng.randint(2, 5)]
    n = rng.randint(1, 60)
    gold = [rng.choice(classes) for _ in range(n)]
    pred = [rng.choice(classes) for _ in range(n)]
    assert accuracy(gold, pred) == pytest.approx(accuracy_score(gold, pred))
    assert macro_f1(gold, pred, classes) == pytest.approx(f1_score(gold, pred, average="macro", zero_division=0))
    theirs = f1_score(gold, pred, labels=classes, average=None, zero_division=0)
    assert list(per_class_f1(gold, pred, classes).values()) == pytest.approx(list(theirs))


@pytest.mark.parametrize("seed", range(20))
def test_span_scores_agree_with_seqeval_on_random_bio_tags(seed):
    import random

    from seqeval.metrics import f1_score, precision_score, recall_score

    rng = random.Random(seed)
    tags = ["O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ARG1", "I-ARG1"]
    lengths = [rng.randint(1, 12) for _ in range(rng.randint(1, 8))]
    gold = [[rng.choice(tags) for _ in range(k)] for k in lengths]
    pred = [[t if rng.random() < 0.6 else rng.choice(tags) for t in g] for g in gold]
    ours = span_prf(gold, pred)
    assert ours["precision"] == pytest.approx(precision_score(gold, pred, zero_division=0))
    assert ours["recall"] == pytest.approx(recall_score(gold, pred, zero_division=0))
    assert ours["f1"] == pytest.approx(f1_score(gold, pred, zero_division=0))
