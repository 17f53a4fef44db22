"""A real 2-worker run of a classification task (sequence classification, with LoRA), shared by its
tests: the distributed test evaluation gives a single process's metrics and predictions. Tokens and
images go through the same gathered evaluation (`classify` in trainer/tasks/common.py: each rank
predicts its examples, rank 0 scores the gathered predictions), so one launch proves it for the three
tasks; tests/loop/test_tasks_loop.py trains, tests and exports every task in one process and runs each
export in a transformers pipeline."""
import json
from pathlib import Path

import pytest

from tests.e2e.common import launch, scalars
from tests.helpers import make_wordpiece_tokenizer, task_config, write_config

pytestmark = pytest.mark.e2e

# The sequence classification run fine-tunes with LoRA (adapters + a fully trained head) on 2 workers.
TASKS = {"sequence_classification": ("text-classification", "accuracy",
                                     {"finetune": {"mode": "lora", "lora": {"r": 8, "dropout": 0.0}}})}


@pytest.fixture(scope="session", params=list(TASKS))
def task_run(request, tmp_path_factory):
    task = request.param
    tmp = tmp_path_factory.mktemp(task)
    tokenizer = make_wordpiece_tokenizer(tmp / "tok")
    raw = task_config(tmp, task, tokenizer=tokenizer, **TASKS[task][2])
    raw["data"] = {**task_config(tmp, task, tokenizer=tokenizer)["data"], **TASKS[task][2].get("data", {})}
    config = write_config(tmp / "task.yaml", raw)
    proc = launch(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return task, tmp / "run", config


def _single_process_metrics(out: Path, config: Path, task: str):
    """The same checkpoint's export evaluated in this one process (world size 1)."""
    import transformers

    from trainer.config_load import load_config
    from trainer.data import load_splits
    from trainer.evaluation import Shard
    from trainer.model import auto_class
    from trainer.tasks.registry import get_task

    cfg, module = load_config(config), get_task(task)
    model = auto_class(task).from_pretrained(out / "final_model").eval()
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    processor = transformers.AutoTokenizer.from_pretrained(out / "final_model")
    prepared = module.prepare(load_splits(cfg)[2], cfg, processor, labels)
    shard = Shard(lambda b: model(**b).logits, module.collator(processor), 0, 1, 8, "cpu")
    return module.evaluate(shard, prepared, labels)


def test_metrics_before_and_after_and_predictions(task_run):
    task, out, _ = task_run
    metrics = json.loads((out / "test_metrics.json").read_text())
    main = TASKS[task][1]
    assert metrics["after"][main] > metrics["before"][main]
    assert metrics["after"]["loss"] < metrics["before"]["loss"]
    assert {"accuracy", "macro_f1", "per_class_f1"} <= metrics["after"].keys()
    rows = [json.loads(line) for line in (out / "test_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == metrics["after"]["examples"] == len({r["id"] for r in rows})
    assert len(rows) % 2 == 1  # the test split does not divide by the world size
    assert scalars(out / "tensorboard", f"test/{main}")[metrics["step"]] == pytest.approx(metrics["after"][main])


def test_distributed_metrics_equal_a_single_process_evaluation(task_run):
    task, out, config = task_run
    after = json.loads((out / "test_metrics.json").read_text())["after"]
    single, rows = _single_process_metrics(out, config, task)
    written = [json.loads(line) for line in (out / "test_predictions.jsonl").read_text().splitlines()]
    assert [r["predicted"] for r in rows] == [r["predicted"] for r in written]
    for key, value in single.items():
        if isinstance(value, float):
            assert after[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_exported_model_works_in_a_pipeline_with_label_names(task_run):
    import transformers

    task, out, _ = task_run
    pipe = transformers.pipeline(TASKS[task][0], model=str(out / "final_model"))
    labels = set(json.loads((out / "final_model" / "config.json").read_text())["id2label"].values())
    assert pipe("Heavy rain is expected in Oslo today")[0]["label"] in labels


def test_lora_run_trains_adapters_and_exports_a_plain_model(task_run):
    _, out, _ = task_run
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["config"]["finetune"]["mode"] == "lora"
    assert 0 < summary["trainable_parameters"] < 0.3 * summary["total_parameters"]
    weights = (out / "final_model" / "model.safetensors")
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        names = list(f.keys())
    assert names and not any("lora" in n or "base_model.model" in n for n in names)  # merged, plain names
