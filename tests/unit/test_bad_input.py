"""The bad-input catalogue: each mistake is one paragraph naming the key or file, exit code 2, and
nothing is started or written. Calls the command line in-process (errors come before Ray starts);
tests/unit/test_cli.py runs it once as a real subprocess."""
import json
import re
from pathlib import Path

import pytest

from tests.helpers import DATA, make_image_processor, run_cli, tiny_config, write_config


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def sft_rows(n=30):
    return [json.loads(line) for line in DATA.read_text().splitlines()[:n]]


def with_null_prompt_on_line_8(tmp):
    rows = sft_rows()
    rows[7]["prompt"] = None
    return jsonl(tmp / "null.jsonl", rows)


def tiny_bert_classifier(tmp, tok, num_labels):
    """A pretrained-style model folder whose own head is for `num_labels` labels."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    target = tmp / "pretrained"
    BertForSequenceClassification(BertConfig(vocab_size=400, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32, num_labels=num_labels)).save_pretrained(target)
    AutoTokenizer.from_pretrained(tok).save_pretrained(target)
    return str(target)


def tokenizer_without_template(tmp, tok):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tok)
    t.chat_template = None
    t.save_pretrained(tmp / "plain-tok")
    return str(tmp / "plain-tok")


# Renders the last turn first: appending a turn changes what came before it.
SHUFFLING_TEMPLATE = ("{% for m in messages|reverse %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                      "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tokenizer_with_template(tmp, tok, template):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tok)
    t.chat_template = template
    t.save_pretrained(tmp / "odd-tok")
    return str(tmp / "odd-tok")


def chats(tmp):
    return jsonl(tmp / "chats.jsonl", [{"messages": [{"role": "user", "content": r["prompt"]},
                                                     {"role": "assistant", "content": r["response"]},
                                                     {"role": "user", "content": "again"},
                                                     {"role": "assistant", "content": r["response"]}]}
                                       for r in sft_rows()])


def checkpoint_of_another_model(tmp):
    path = tmp / "other" / "step_0000004"
    (path / "ds").mkdir(parents=True)
    for rank in (0, 1):
        (path / f"rng_rank{rank}.pt").write_bytes(b"x")
    (path / "trainer_state.json").write_text(json.dumps(
        {"step": 4, "micro_step": 4, "world_size": 2, "zero_stage": 2, "model": "gpt2:causal_lm"}))
    (path / ".complete").write_text("ok\n")
    return str(path)


def bert_cls(tmp, tok, **data):
    return tiny_config(tmp, tok, model={"architecture": {"model_type": "bert", "vocab_size": 400, "hidden_size": 16,
                                                         "num_hidden_layers": 1, "num_attention_heads": 2,
                                                         "intermediate_size": 32},
                                        "tokenizer": str(tok), "task": "sequence_classification"}, data=data)


def topics(tmp, name="t.jsonl", n=20, drop=None):
    rows = [{"text": f"text number {i}", "label": "ab"[i % 2]} for i in range(n)]
    return jsonl(tmp / name, [{k: v for k, v in r.items() if k != drop} for r in rows])


def run_already_tested(tmp):
    """An output directory whose run already wrote its test results."""
    (tmp / "tested").mkdir()
    (tmp / "tested" / "test_metrics.json").write_text("{}")
    return str(tmp / "tested")


def checkpoint_that_stopped_early(tmp):
    path = Path(checkpoint_of_another_model(tmp))
    state = json.loads((path / "trainer_state.json").read_text())
    (path / "trainer_state.json").write_text(json.dumps({**state, "stopped_early": True}))
    return str(path)


CASES = {
    "yaml_syntax": (lambda tmp, tok: "model: {name_or_path: x\n", r"YAML syntax error at line 2"),
    "unknown_key": (lambda tmp, tok: tiny_config(tmp, tok, optim={"learning_rate": 1e-3}),
                    r"unknown key 'optim.learning_rate'"),
    "wrong_type": (lambda tmp, tok: tiny_config(tmp, tok, train={"max_steps": "ten"}),
                   r"train.max_steps must be an integer or null, got 'ten' \(str\)"),
    "lr_not_positive": (lambda tmp, tok: tiny_config(tmp, tok, optim={"lr": -1e-4}), r"optim.lr must be > 0"),
    "zero_stage_5": (lambda tmp, tok: tiny_config(tmp, tok, deepspeed={"zero_stage": 5}),
                     r"deepspeed.zero_stage must be 0, 1, 2 or 3, got 5"),
    "missing_file": (lambda tmp, tok: tiny_config(tmp, tok, data={"train_file": str(tmp / "gone.jsonl")}),
                     r"data.train_file: file .*gone.jsonl not found"),
    "missing_column": (lambda tmp, tok: tiny_config(tmp, tok, data={"train_file": jsonl(
        tmp / "q.jsonl", [{"question": "q", "answer": "a"}] * 10)}), r"q.jsonl: cannot tell the data format from its columns \(found: question, answer\); expected one of pair: 'prompt' and 'response'"),
    "empty_split": (lambda tmp, tok: tiny_config(tmp, tok, data={
        "train_file": str(DATA), "validation_file": jsonl(tmp / "v.jsonl", []), "test_file": str(DATA)}),
        r"v.jsonl: the validation split is empty"),
    "all_truncated": (lambda tmp, tok: tiny_config(tmp, tok, data={"train_file": jsonl(
        tmp / "long.jsonl", [{"prompt": "word " * 200, "response": "yes"}] * 10), "max_length": 16}),
        r"every response in the train split was truncated away by data.max_length = 16"),
    "label_out_of_range": (lambda tmp, tok: tiny_config(
        tmp, tok, model={"architecture": {"model_type": "bert", "vocab_size": 400, "hidden_size": 16,
                                          "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32},
                         "tokenizer": str(tok), "task": "sequence_classification"},
        data={"train_file": jsonl(tmp / "c.jsonl", [{"text": f"t {i}", "label": i % 3} for i in range(20)]),
              "labels": ["a", "b"]}),
        r"c.jsonl, train split, line \d+, column 'label': label 2 is not in the label set"),
    "nothing_trainable": (lambda tmp, tok: tiny_config(tmp, tok, finetune={"mode": "local", "freeze": ["*"]}),
                          r"leave nothing to train"),
    "freeze_matches_nothing": (lambda tmp, tok: tiny_config(tmp, tok, finetune={"mode": "local",
                                                                                "freeze": ["encoder.*"]}),
                               r"finetune.freeze\[0\] = 'encoder.\*' matches no parameter"),
    "resume_without_checkpoint": (lambda tmp, tok: (tiny_config(tmp, tok), ["--resume"]),
                                  r"--resume: no complete checkpoint under"),
    "max_length_beyond_positions": (lambda tmp, tok: tiny_config(tmp, tok, data={"max_length": 4096}),
                                    r"data.max_length = 4096 is longer than the model can take: 128 positions \(the "
                                    r"model config's n_positions\); set data.max_length to 128 or less"),
    "null_prompt_names_the_file_line": (lambda tmp, tok: tiny_config(tmp, tok, data={
        "train_file": with_null_prompt_on_line_8(tmp)}), r"null.jsonl, \w+ split, line 8, column 'prompt': must be text, "
                                                         r"got None"),
    "deepspeed_json_not_json": (lambda tmp, tok: tiny_config(tmp, tok, deepspeed={"config_file": str(
        (tmp / "ds.json").write_text("{stage: 2") and tmp / "ds.json")}), r"deepspeed.config_file: .*ds.json is not valid JSON"),
    "deepspeed_json_owned_key": (lambda tmp, tok: tiny_config(tmp, tok, deepspeed={"config_file": str(
        (tmp / "ds.json").write_text('{"optimizer": {"type": "SGD"}}') and tmp / "ds.json")}),
        r"deepspeed.config_file .*ds.json sets 'optimizer'; it comes from optim"),
    "deepspeed_json_missing": (lambda tmp, tok: tiny_config(tmp, tok, deepspeed={"config_file": str(tmp / "no.json")}),
                               r"deepspeed.config_file: .*no.json not found"),
    "head_of_another_size": (lambda tmp, tok: tiny_config(tmp, tok, model={
        "name_or_path": tiny_bert_classifier(tmp, tok, 3), "architecture": None, "tokenizer": None,
        "task": "sequence_classification"},
        data={"train_file": topics(tmp)}), r"has a head for 3 labels, the data has 2; set model.reinit_head: true"),
    "data_not_utf8": (lambda tmp, tok: tiny_config(tmp, tok, data={"train_file": str(
        (tmp / "latin.jsonl").write_bytes('{"prompt": "caf\u00e9", "response": "ok"}\n'.encode("latin-1") * 9)
        and tmp / "latin.jsonl")}), r"data.train_file: cannot read .*latin.jsonl as json"),
    "csv_ragged_row": (lambda tmp, tok: tiny_config(tmp, tok, data={"train_file": str(
        (tmp / "r.csv").write_text("prompt,response\n" + "a,b\n" * 5 + "a,b,c,d\n" + "a,b\n" * 5)
        and tmp / "r.csv")}), r"data.train_file: cannot read .*r.csv as csv"),
    "yaml_duplicate_key": (lambda tmp, tok: "model: {name_or_path: x}\ndata: {train_file: a.jsonl}\ntrain: {epochs: 1}\n"
                                            "train: {max_steps: 3}\n",
                           r"key 'train' appears twice \(first at line 3\)"),
    "set_unknown_key": (lambda tmp, tok: (tiny_config(tmp, tok), ["--set", "optim.lrr=1e-3"]),
                        r"unknown key 'optim.lrr'. Did you mean 'optim.lr'\?"),
    "set_without_value": (lambda tmp, tok: (tiny_config(tmp, tok), ["--set", "optim.lr"]),
                          r"--set 'optim.lr': expected key=value"),
    "labels_mix_names_and_numbers": (lambda tmp, tok: bert_cls(tmp, tok, train_file=jsonl(
        tmp / "mix.jsonl", [{"text": f"t {i}", "label": "sports" if i % 2 else 3} for i in range(20)])),
        r"mix.jsonl: column 'label' \(data.label_column\) mixes label names and numbers"),
    "image_path_missing": (lambda tmp, tok: tiny_config(tmp, tok, model={
        "architecture": {"model_type": "resnet", "num_channels": 3, "embedding_size": 8, "hidden_sizes": [8],
                         "depths": [1], "layer_type": "basic"},
        "image_processor": str(make_image_processor(tmp / "proc")), "task": "image_classification"},
        data={"train_file": jsonl(tmp / "img.jsonl", [{"image": f"img{i}.png", "label": i % 2} for i in range(12)])}),
        r"img.jsonl, \w+ split, line \d+, column 'image': unreadable image \(FileNotFoundError"),
    "chat_template_missing": (lambda tmp, tok: tiny_config(tmp, tok, model={"tokenizer": tokenizer_without_template(tmp, tok)},
                                                           data={"template": "chat"}),
                              r"data.template is 'chat' but the tokenizer has no chat template"),
    "test_split_without_label_column": (lambda tmp, tok: bert_cls(
        tmp, tok, train_file=topics(tmp), validation_file=topics(tmp, "v.jsonl"),
        test_file=topics(tmp, "te.jsonl", drop="label")), r"te.jsonl: the test split has no column 'label' "
                                                         r"\(data.label_column\)"),
    "less_than_one_step": (lambda tmp, tok: tiny_config(tmp, tok, train={"max_steps": None, "epochs": 0.0001}),
                           r"train.epochs = 0.0001 is less than one optimizer step"),
    "resume_another_models_checkpoint": (lambda tmp, tok: (tiny_config(tmp, tok), ["--resume",
                                                                                   checkpoint_of_another_model(tmp)]),
                                         r"the checkpoint is of model 'gpt2:causal_lm', but the config trains "
                                         r"'architecture:"),
    "unknown_task": (lambda tmp, tok: tiny_config(tmp, tok, model={"task": "summarization"}),
                     r"model.task must be one of causal_lm, sequence_classification"),
    "image_task_without_processor": (lambda tmp, tok: tiny_config(tmp, tok, model={
        "architecture": {"model_type": "resnet"}, "tokenizer": None, "task": "image_classification"}),
        r"model.image_processor is required with model.architecture"),
    "fractions_not_summing_to_one": (lambda tmp, tok: tiny_config(tmp, tok, data={"fractions": [0.8, 0.3, 0.1]}),
                                     r"data.fractions must be three positive numbers .* summing to 1"),
    "warmup_steps_and_ratio": (lambda tmp, tok: tiny_config(tmp, tok, optim={"warmup_ratio": 0.1}),
                               r"set optim.warmup_steps or optim.warmup_ratio, not both"),
    "too_many_last_layers": (lambda tmp, tok: tiny_config(tmp, tok, finetune={"mode": "local", "train_last_layers": 9}),
                             r"finetune.train_last_layers = 9 but the model has only 2 transformer blocks"),
    "chat_without_assistant_turn": (lambda tmp, tok: tiny_config(tmp, tok, data={"train_file": jsonl(
        tmp / "chat.jsonl", [{"messages": [{"role": "user", "content": f"hi {i}"}]} for i in range(12)])}),
        r"chat.jsonl, \w+ split, line \d+, column 'messages': the conversation has no assistant turn to learn"),
    "train_file_source_missing": (lambda tmp, tok: tiny_config(tmp, tok, data={"train_file": [
        str(DATA), {"path": str(tmp / "gone.jsonl"), "weight": 2}]}), r"data.train_file\[1\]: file .*gone.jsonl not found"),
    "train_file_weight_not_positive": (lambda tmp, tok: tiny_config(tmp, tok, data={"train_file": [
        {"path": str(DATA), "weight": 0}]}), r"data.train_file\[0\]: weight must be > 0, got 0.0"),
    "mix_of_different_label_sets": (lambda tmp, tok: bert_cls(tmp, tok, train_file=[topics(tmp), jsonl(
        tmp / "cd.jsonl", [{"text": f"text {i}", "label": "cd"[i % 2]} for i in range(20)])]),
        r"data.train_file: the sources have different label sets .*list the labels of the whole mix in data.labels"),
    "early_stopping_on_a_metric_the_task_lacks": (lambda tmp, tok: tiny_config(tmp, tok, train={
        "early_stopping": {"metric": "accuracy", "mode": "max"}}),
        r"train.early_stopping.metric is 'accuracy', but model.task 'causal_lm' reports loss, perplexity"),
    "resume_a_run_that_stopped_early": (lambda tmp, tok: (tiny_config(tmp, tok), ["--resume",
                                                                                  checkpoint_that_stopped_early(tmp),
                                                                                  "--output", run_already_tested(tmp)]),
                                        r"the run stopped early at step 4 \(train.early_stopping"),
    "best_checkpoint_of_an_evaluation_never_saved": (lambda tmp, tok: tiny_config(tmp, tok, test={"checkpoint": "best"},
                                                                                   train={"eval_every": 4, "save_every": 8}),
                                                     r"test.checkpoint: best .* train.eval_every \(4\) must be a "
                                                     r"multiple of train.save_every \(8\)"),
    "generate_negative_examples": (lambda tmp, tok: tiny_config(tmp, tok, eval={"generate": {"num_examples": -1}}),
                                   r"eval.generate.num_examples must be >= 0 \(0 turns it off\), got -1"),
    "generate_for_a_classifier": (lambda tmp, tok: bert_cls(tmp, tok, train_file=topics(tmp)) | {
        "eval": {"generate": {"num_examples": 4}}}, r"eval.generate.num_examples is 4, but model.task "
                                                    r"'sequence_classification' does not generate text"),
    "global_mode_with_freezing_rules": (lambda tmp, tok: tiny_config(tmp, tok, finetune={"mode": "global",
                                                                                        "freeze": ["lm_head.*"]}),
                                        r"finetune.mode is 'global' \(every weight trains\) but finetune.freeze is set"),
    # sft-launch --tune: every mistake in tune: is refused before any trial starts
    "tune_space_key_that_does_not_exist": (lambda tmp, tok: (tune(tmp, tok, {"optim.lrr": {"loguniform": [1e-5, 1e-3]}}),
                                                             ["--tune"]), r"tune.space.optim.lrr: no such config key"),
    "tune_unknown_distribution": (lambda tmp, tok: (tune(tmp, tok, {"optim.lr": {"normal": [0.1, 1]}}), ["--tune"]),
                                  r"tune.space.optim.lr must be one distribution, one of \{uniform"),
    "tune_range_the_key_refuses": (lambda tmp, tok: (tune(tmp, tok, {"train.micro_batch_size": {"uniform": [1, 8]}}),
                                                     ["--tune"]),
                                   r"tune.space.train.micro_batch_size: the search could give it 1.0, which the "
                                   r"config refuses: train.micro_batch_size must be an integer"),
    "tune_grid_value_the_key_refuses": (lambda tmp, tok: (tune(tmp, tok, {"optim.scheduler": {"grid": ["linear",
                                                                                                      "sawtooth"]}}),
                                                          ["--tune"]),
                                        r"tune.space.optim.scheduler: the search could give it 'sawtooth'"),
    "tune_value_the_model_refuses": (lambda tmp, tok: (tune(tmp, tok, {"finetune.train_last_layers": {"choice": [1, 9]}},
                                                            finetune={"mode": "local", "train_last_layers": 1}),
                                                       ["--tune"]),
                                     r"tune.space.finetune.train_last_layers: the search could give it 9, which the "
                                     r"model refuses"),
    "tune_the_search_settings": (lambda tmp, tok: (tune(tmp, tok, {"scaling.nodes": {"choice": [1, 2]}}), ["--tune"]),
                                 r"tune.space.scaling.nodes: tune, output_dir, scaling, slurm are the search's own"),
    "tune_metric_the_task_lacks": (lambda tmp, tok: (tune(tmp, tok, {"optim.lr": {"choice": [1e-3]}}, metric="f1"),
                                                     ["--tune"]),
                                   r"tune.metric is 'f1', but model.task 'causal_lm' reports loss, perplexity"),
    "tune_bad_range": (lambda tmp, tok: (tune(tmp, tok, {"optim.lr": {"loguniform": [1e-3, 1e-5]}}), ["--tune"]),
                       r"tune.space.optim.lr: loguniform takes \[low, high\] \(low > 0\) with low < high"),
    # A chat column with a tokenizer that cannot render chats (the settings' fault, said once), and a
    # template that re-renders earlier turns (the row is named, data.skip_bad_rows can skip it).
    "messages_without_a_chat_template": (lambda tmp, tok: tiny_config(tmp, tok, model={
        "tokenizer": tokenizer_without_template(tmp, tok)}, data={"train_file": chats(tmp)}),
        r"the tokenizer has no chat template, and plain text \(prompt \+ response \+ eos\) holds one exchange, but the data has "
        r"system turns, tools or several turns: set data.chat_template"),
    "chat_template_that_is_not_a_growing_prefix": (lambda tmp, tok: tiny_config(tmp, tok, model={
        "tokenizer": tokenizer_with_template(tmp, tok, SHUFFLING_TEMPLATE)}, data={"train_file": chats(tmp)}),
        r"chats.jsonl, \w+ split, line \d+, column 'messages': the chat template does not render the text of assistant turn 1 "
        r"of 2 as given \(it changes, reorders or drops it\)"),
    "tune_without_a_tune_section": (lambda tmp, tok: (tiny_config(tmp, tok), ["--tune"]),
                                    r"--tune needs a tune: section in the config"),
}


def tune(tmp, tok, space, metric="loss", **sections):
    return tiny_config(tmp, tok, tune={"metric": metric, "space": space}, **sections)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_paragraph_and_exit_2(case, tmp_path, tokenizer_dir):
    make, message = CASES[case]
    made = make(tmp_path, tokenizer_dir)
    raw, extra = made if isinstance(made, tuple) else (made, [])
    config = tmp_path / "c.yaml"
    config.write_text(raw) if isinstance(raw, str) else write_config(config, raw)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")  # what the output directory held before
    proc = run_cli(config, *extra)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("sft-launch: error: ") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert re.search(message, proc.stderr), proc.stderr
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["notes.txt"]
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_the_catalogue_covers_at_least_30_mistakes():
    assert len(CASES) >= 30


def test_flash_attention_without_a_gpu_or_the_package_is_refused(tmp_path, tokenizer_dir):
    raw = tiny_config(tmp_path, tokenizer_dir, model={"attn_implementation": "flash_attention_2"})
    proc = run_cli(write_config(tmp_path / "c.yaml", raw))
    assert proc.returncode == 2 and "flash_attention_2 needs a CUDA GPU per worker" in proc.stderr


def test_qlora_is_refused_without_a_gpu(tmp_path, tokenizer_dir):
    raw = tiny_config(tmp_path, tokenizer_dir, finetune={"mode": "lora", "lora": {"quantize": "4bit"}})
    proc = run_cli(write_config(tmp_path / "c.yaml", raw))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "finetune.lora.quantize: 4bit (QLoRA)" in proc.stderr and "CUDA GPUs only" in proc.stderr
