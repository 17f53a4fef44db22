"""Task data preparation: labels, word->sub-word alignment, images, and bad rows named precisely."""
import io

import pytest

from trainer.config import ConfigError
from trainer.config_load import from_dict
from tests.helpers import make_image_processor, make_wordpiece_tokenizer
from trainer.data import Split
from trainer.masking import IGNORE
from trainer.tasks.registry import get_task
from trainer.tasks.token_classification import align_labels


def prepare(cfg, split, processor, labels):
    """The task's own preparation, as the workers and preflight call it."""
    return get_task(cfg.model.task).prepare(split, cfg, processor, labels)


def label_names(cfg, train):
    return get_task(cfg.model.task).label_names(cfg, train)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(make_wordpiece_tokenizer(tmp_path_factory.mktemp("wp")))


def cfg(task, **data):
    return from_dict({"model": {"name_or_path": "x", "task": task}, "data": {"train_file": "d.jsonl", **data}})


def split(records, name="validation"):
    return Split.from_records(name, "d.jsonl", records)


def first(prepared) -> dict:
    return prepared.examples([0])[0]


def golds(prepared) -> list:
    return prepared.column("gold", range(len(prepared)))


def dropped(prepared) -> int:
    return sum(prepared.dropped.values())


def test_labels_from_training_split_or_config():
    train = split([{"text": "a", "label": "sports"}, {"text": "b", "label": "food"}], "train")
    assert label_names(cfg("sequence_classification"), train) == ["food", "sports"]
    assert label_names(cfg("sequence_classification", labels=["x", "y", "z"]), train) == ["x", "y", "z"]
    ids = split([{"text": "a", "label": 2}, {"text": "b", "label": 0}], "train")
    assert label_names(cfg("sequence_classification"), ids) == ["0", "1", "2"]


def test_sequence_classification_rows(tokenizer):
    prepared = prepare(cfg("sequence_classification"),
                       split([{"text": "heavy rain in oslo", "label": "weather"}]), tokenizer, ["food", "weather"])
    assert first(prepared)["labels"] == 1 and golds(prepared) == ["weather"]


def test_unseen_label_names_file_row_and_column(tokenizer):
    rows = [{"text": "rain", "label": "weather"}, {"text": "goal", "label": "sport"}]
    with pytest.raises(ConfigError, match=r"d.jsonl, validation split, line 2, column 'label': label 'sport' is not "
                                          r"in the label set"):
        prepare(cfg("sequence_classification"), split(rows), tokenizer, ["food", "weather"])
    skipped = prepare(cfg("sequence_classification", skip_bad_rows=True), split(rows), tokenizer, ["food", "weather"])
    assert dropped(skipped) == 1 and skipped.column("row", [0]) == [0] and len(skipped) == 1


def test_empty_text_and_missing_column(tokenizer):
    with pytest.raises(ConfigError, match=r"line 1, column 'text': empty or missing text"):
        prepare(cfg("sequence_classification"), split([{"text": "  ", "label": "food"}]), tokenizer, ["food"])
    with pytest.raises(ConfigError, match=r"has no column 'sentence' \(data.text_column\); found columns: text, label"):
        prepare(cfg("sequence_classification", text_column="sentence"), split([{"text": "a", "label": "food"}]),
                tokenizer, ["food"])


def test_tag_count_mismatch(tokenizer):
    with pytest.raises(ConfigError, match=r"line 1, column 'tags': 1 tags for 2 words"):
        prepare(cfg("token_classification"), split([{"tokens": ["maria", "ran"], "tags": ["B-PER"]}]), tokenizer,
                ["B-PER", "O"])


def test_first_subword_carries_the_word_label(tokenizer):
    prepared = prepare(cfg("token_classification"),
                       split([{"tokens": ["Maria", "visited", "Oslo"], "tags": ["B-PER", "O", "B-LOC"]}]),
                       tokenizer, ["B-LOC", "B-PER", "O"])
    labels = first(prepared)["labels"]
    assert labels[0] == IGNORE and labels[-1] == IGNORE  # [CLS], [SEP]
    assert [x for x in labels if x != IGNORE] == [1, 2, 0]


def test_alignment_ignores_later_subwords_and_the_predicate_segment():
    word_ids = [None, 0, 0, 1, None, 0, None]
    sequence_ids = [None, 0, 0, 0, None, 1, None]
    assert align_labels(word_ids, sequence_ids, [5, 7]) == [IGNORE, 5, IGNORE, 7, IGNORE, IGNORE, IGNORE]


def test_srl_predicate_goes_into_the_second_segment(tokenizer):
    row = {"tokens": ["maria", "gave", "omar", "a", "book"], "tags": ["B-ARG0", "B-V", "B-ARG2", "B-ARG1", "I-ARG1"],
           "predicate": 1}
    labels = sorted(set(row["tags"]))
    prepared = prepare(cfg("token_classification"), split([row]), tokenizer, labels)
    ids = first(prepared)["input_ids"]
    assert tokenizer.decode(ids) == "[CLS] maria gave omar a book [SEP] gave [SEP]"
    assert len([x for x in first(prepared)["labels"] if x != IGNORE]) == 5
    with pytest.raises(ConfigError, match=r"column 'predicate': predicate index 9 is not a word position 0..4"):
        prepare(cfg("token_classification"), split([{**row, "predicate": 9}]), tokenizer, labels)


def test_images_from_bytes_and_an_unreadable_one(tmp_path):
    from PIL import Image
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(make_image_processor(tmp_path / "p"))
    buf = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buf, format="PNG")
    rows = [{"image": {"bytes": buf.getvalue(), "path": None}, "label": 3},
            {"image": {"bytes": None, "path": "missing.png"}, "label": 1}]
    with pytest.raises(ConfigError, match=r"line 2, column 'image': unreadable image \(FileNotFoundError"):
        prepare(cfg("image_classification"), split(rows), processor, [str(i) for i in range(10)])
    ok = prepare(cfg("image_classification", skip_bad_rows=True), split(rows), processor, [str(i) for i in range(10)])
    assert first(ok)["pixel_values"].shape == (3, 32, 32) and golds(ok) == ["3"] and dropped(ok) == 1


def test_classlabel_names_are_the_label_set_and_ids_map_to_them(tokenizer):
    import datasets

    from trainer.data import _class_names

    features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                  "tags": datasets.Sequence(datasets.ClassLabel(names=["O", "B-PER", "I-PER"]))})
    ds = datasets.Dataset.from_dict({"tokens": [["maria", "lopez", "ran"]], "tags": [[1, 2, 0]]}, features=features)
    names = _class_names(ds)
    assert names == {"tags": ["O", "B-PER", "I-PER"]}
    train = Split("train", "hub:train", ds, names)
    labels = label_names(cfg("token_classification"), train)
    assert labels == ["O", "B-PER", "I-PER"]
    assert golds(prepare(cfg("token_classification"), train, tokenizer, labels)) == [["B-PER", "I-PER", "O"]]


def test_boolean_labels(tokenizer):
    train = split([{"text": "rain", "label": True}, {"text": "goal", "label": False}], "train")
    labels = label_names(cfg("sequence_classification"), train)
    assert labels == ["False", "True"]
    assert golds(prepare(cfg("sequence_classification"), train, tokenizer, labels)) == ["True", "False"]


def test_sft_bad_rows_stop_the_run_or_are_skipped(tmp_path):
    from transformers import AutoTokenizer

    from tests.helpers import make_tokenizer
    tok = AutoTokenizer.from_pretrained(make_tokenizer(tmp_path / "bpe"))
    rows = [{"prompt": "What is 2 plus 2?", "response": "Answer: 4."}, {"prompt": "Hi", "response": " "}]
    with pytest.raises(ConfigError, match=r"line 2, column 'response': is empty"):
        prepare(cfg("causal_lm"), split(rows), tok, [])
    prepared = prepare(cfg("causal_lm", skip_bad_rows=True), split(rows), tok, [])
    assert len(prepared) == 1 and dropped(prepared) == 1
