"""Each classification task through the worker loop in one process: train, test, export."""
import json

import pytest

from trainer.config_load import from_dict
from tests.helpers import make_image_processor, make_wordpiece_tokenizer, task_config
from trainer.loop import WorkerArgs, run, run_test
from trainer.report import ListReporter


@pytest.fixture(scope="session")
def wordpiece(tmp_path_factory):
    return make_wordpiece_tokenizer(tmp_path_factory.mktemp("wordpiece"))


@pytest.fixture(scope="session")
def image_processor(tmp_path_factory):
    return make_image_processor(tmp_path_factory.mktemp("processor"))


@pytest.mark.parametrize("task, main", [("sequence_classification", "accuracy"),
                                        ("token_classification", "f1"),
                                        ("image_classification", "accuracy")])
def test_task_trains_tests_and_exports(tmp_path, wordpiece, image_processor, process_group, task, main):
    raw = task_config(tmp_path, task, tokenizer=wordpiece, processor=image_processor,
                      scaling={"workers_per_node": 1})
    dtype = "bf16" if task == "sequence_classification" else "auto"  # auto: the fp32 the run trained in
    cfg = from_dict({**raw, "export": {"dtype": dtype}})
    reporter = ListReporter(tmp_path / "ckpt")
    run(cfg, reporter, WorkerArgs(cache_dir=str(tmp_path / "cache")))
    assert main in reporter.calls[0][0].validation
    result = run_test(cfg, ListReporter(), WorkerArgs(
        cache_dir=str(tmp_path / "cache"), final_checkpoint=str(reporter.calls[-1][1]),
        export_dir=str(tmp_path / "final"), predictions_path=str(tmp_path / "pred.jsonl")))
    assert result.after["loss"] < result.before["loss"]
    assert "exact_match" not in result.after  # classifiers generate no text
    rows = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert len(rows) == result.after["examples"] and [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    assert json.loads((tmp_path / "final" / "config.json").read_text())["id2label"]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "final" / "model.safetensors"), "pt") as f:
        dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    assert dtypes - {"I64"} == ({"BF16"} if dtype == "bf16" else {"F32"})  # I64: batch-norm step counts
    # The export works in a transformers pipeline and names the labels (the text classifier's: tests/e2e).
    import transformers

    labels = set(json.loads((tmp_path / "final" / "config.json").read_text())["id2label"].values())
    if task == "image_classification":
        from datasets import load_dataset

        from tests.helpers import REPO

        pipe = transformers.pipeline("image-classification", model=str(tmp_path / "final"))
        image = load_dataset("parquet", data_files=str(REPO / "data" / "digits.parquet"), split="train")[0]["image"]
        assert pipe(image)[0]["label"] in labels
    elif task == "token_classification":
        pipe = transformers.pipeline("token-classification", model=str(tmp_path / "final"), ignore_labels=[])
        found = pipe("Maria Lopez visited Paris last year .")  # ignore_labels=[]: every word, "O" too
        assert len(found) >= 7 and all(e["entity"] in labels for e in found)


@pytest.mark.parametrize("task", ["token_classification", "image_classification"])
def test_lora_trains_the_other_classifiers_and_exports_a_plain_model(tmp_path, wordpiece, image_processor,
                                                                     process_group, task):
    """finetune.mode: lora beyond the text classifier the e2e run covers: adapters on the BERT's linear
    layers, and on the ConvNet's convolutions; the head trains fully; the export has no peft names."""
    from safetensors import safe_open

    raw = task_config(tmp_path, task, tokenizer=wordpiece, processor=image_processor, scaling={"workers_per_node": 1})
    cfg = from_dict({**raw, "finetune": {"mode": "lora", "lora": {"r": 4, "dropout": 0.0}}})
    reporter = ListReporter(tmp_path / "ckpt")
    run(cfg, reporter, WorkerArgs(cache_dir=str(tmp_path / "cache")))
    result = run_test(cfg, ListReporter(), WorkerArgs(cache_dir=str(tmp_path / "cache"), export_dir=str(tmp_path / "final"),
                                                      final_checkpoint=str(reporter.calls[-1][1])))
    assert result.after["loss"] < result.before["loss"]
    with safe_open(str(tmp_path / "final" / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and not any("lora" in n or "base_model" in n for n in names)
