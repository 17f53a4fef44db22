"""token_classification: words -> one BIO tag per word (NER), optionally with a predicate (SRL).

The first sub-word of each word carries the word's tag, later sub-words are ignored in the loss.
SRL rows give the predicate's word index; that word is passed as the second segment
([CLS] words [SEP] predicate [SEP]) and only first-segment words are labelled. Metrics: loss,
precision / recall / F1 over BIO spans (conlleval) and word accuracy. Never imports ray.
"""
from __future__ import annotations

from trainer.config import DataConfig, RunConfig
from trainer.masking import IGNORE
from trainer.metrics import accuracy, span_prf
from trainer.data import Prepared
from trainer.tasks.common import DROP, bad, classify, encode_split, label_id, label_set, model_loss, \
    require_columns, require_rows

loss = model_loss  # the training objective (trainer/tasks/common.py)


def check_columns(split, d: DataConfig) -> None:
    require_columns(split, [(d.tokens_column, "data.tokens_column"), (d.tags_column, "data.tags_column")])


def label_names(cfg: RunConfig, train) -> list[str]:
    return label_set(cfg, train, cfg.data.tags_column, "data.tags_column",
                     lambda tags: tags if isinstance(tags, list) else [])


def align_labels(word_ids: list, sequence_ids: list, tag_ids: list[int]) -> list[int]:
    """One label per token: the first sub-word of each word of the first segment; IGNORE elsewhere."""
    labels, previous = [], None
    for word, seq in zip(word_ids, sequence_ids):
        first = word is not None and seq == 0 and word != previous
        labels.append(tag_ids[word] if first else IGNORE)
        if seq == 0:
            previous = word
    return labels


def _problem(words, tags, p, labels: list[str], d: DataConfig) -> str:
    """The row's DROP value: "" or what is wrong with it."""
    if not isinstance(words, list) or not words or not all(isinstance(w, str) and w for w in words):
        return bad(d.tokens_column, "expected a non-empty list of words")
    if not isinstance(tags, list) or len(tags) != len(words):
        return bad(d.tags_column, f"{len(tags) if isinstance(tags, list) else 'no'} tags for {len(words)} words; "
                                  f"expected one tag per word")
    unknown = [t for t in tags if label_id(t, labels) is None]
    if unknown:
        return bad(d.tags_column, f"tag {unknown[0]!r} is not in the tag set taken from the training split "
                                  f"(or data.labels)")
    if not isinstance(p, int) or isinstance(p, bool) or not 0 <= p < len(words):
        return bad(d.predicate_column, f"predicate index {p!r} is not a word position 0..{len(words) - 1}")
    return ""


def prepare(split, cfg: RunConfig, tokenizer, labels: list[str], scratch=None) -> Prepared:
    """Per example also its gold tags (every word, also those cut off by max_length), its word count
    and the word of each labelled token, for word-level predictions."""
    d = cfg.data
    require_rows(split)
    check_columns(split, d)
    has_predicate = d.predicate_column in split.columns

    def encode(batch: dict) -> dict:
        n = len(batch[d.tokens_column])
        predicates = batch[d.predicate_column] if has_predicate else [0] * n
        out: dict = {k: [] for k in (*tokenizer.model_input_names, "labels", "gold", "n_words", "word_of", DROP)}
        for words, tags, p in zip(batch[d.tokens_column], batch[d.tags_column], predicates):
            drop = _problem(words, tags, p, labels, d)
            if drop:
                words, ids, pair = ["-"], [0], None
            else:
                ids = [label_id(t, labels) for t in tags]
                pair = [words[p]] if has_predicate else None
            enc = tokenizer(words, pair, is_split_into_words=True, truncation="only_first" if pair else True,
                            max_length=d.max_length)
            aligned = align_labels(enc.word_ids(), enc.sequence_ids(), ids)
            for k in tokenizer.model_input_names:
                out[k].append(enc[k])
            out["labels"].append(aligned)
            out["gold"].append([labels[t] for t in ids])
            out["n_words"].append(len(words))
            out["word_of"].append([w for w, label in zip(enc.word_ids(), aligned) if label != IGNORE])
            out[DROP].append(drop)
        return out

    return encode_split(split, cfg, encode, (*tokenizer.model_input_names, "labels"), scratch=scratch)


def collator(tokenizer):
    from transformers import DataCollatorForTokenClassification

    return DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORE, return_tensors="pt")


def count(examples: list[dict]) -> int:
    return sum(len(e["input_ids"]) for e in examples)


def predict_words(logits, batch, notes: list, labels: list[str]) -> list[list[str]]:
    """Per example, one tag per word; words without a labelled token (cut off by max_length, or
    tokenized to nothing) are predicted O. `notes`: per example (word count, the word of each
    labelled token)."""
    out, best = [], logits.argmax(-1)
    for row, (n_words, word_of) in enumerate(notes):
        tags = ["O"] * n_words
        for word, tag in zip(word_of, best[row][batch["labels"][row] != IGNORE].tolist()):
            tags[word] = labels[tag]
        out.append(tags)
    return out


def evaluate(shard, prepared: Prepared, labels: list[str]) -> tuple[dict, list[dict]]:
    def scores(golds, preds):
        words = [(g, p) for gs, ps in zip(golds, preds) for g, p in zip(gs, ps)]
        return {**span_prf(golds, preds), "token_accuracy": accuracy([g for g, _ in words], [p for _, p in words])}

    def predict(logits, batch, positions):
        notes = zip(prepared.column("n_words", positions), prepared.column("word_of", positions))
        return predict_words(logits, batch, list(notes), labels)

    return classify(shard, prepared, predict, scores)
