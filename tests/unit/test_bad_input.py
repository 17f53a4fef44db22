"""The bad-input catalogue: each mistake is one paragraph naming the key or file, exit code 2, and
nothing is started or written. Runs the real command line (errors come before Ray starts)."""
import json
import subprocess
import sys

import pytest

from tests.helpers import DATA, tiny_config, write_config


def run_cli(config, *extra):
    return subprocess.run([sys.executable, "-m", "launcher.cli", str(config), *extra], capture_output=True,
                          text=True, timeout=300)


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
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
        tmp / "q.jsonl", [{"question": "q", "answer": "a"}] * 10)}), r"expected a 'messages' column, or 'prompt'"),
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
        r"row \d+, column 'label': label 2 is not in the label set"),
    "nothing_trainable": (lambda tmp, tok: tiny_config(tmp, tok, finetune={"mode": "local", "freeze": ["*"]}),
                          r"leave nothing to train"),
    "freeze_matches_nothing": (lambda tmp, tok: tiny_config(tmp, tok, finetune={"mode": "local",
                                                                                "freeze": ["encoder.*"]}),
                               r"finetune.freeze\[0\] = 'encoder.\*' matches no parameter"),
    "resume_without_checkpoint": (lambda tmp, tok: tiny_config(tmp, tok), r"--resume: no complete checkpoint under"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_paragraph_and_exit_2(case, tmp_path, tokenizer_dir):
    make, message = CASES[case]
    raw = make(tmp_path, tokenizer_dir)
    config = tmp_path / "c.yaml"
    config.write_text(raw) if isinstance(raw, str) else write_config(config, raw)
    proc = run_cli(config, *(["--resume"] if case == "resume_without_checkpoint" else []))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("sft-launch: error: ") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    import re
    assert re.search(message, proc.stderr), proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
