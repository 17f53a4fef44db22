"""The command line: bad input is one paragraph and exit code 2; --dry-run prints the plan. The first
test runs the real command as a subprocess (exit code and stderr as a shell sees them); the others
call it in-process."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, SMOLLM2, tiny_config, write_config
from tests.helpers import run_cli as cli


def test_bad_key_is_one_paragraph_and_exit_2_in_a_real_process(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: {name_or_path: gpt2}\ndata: {train_file: x.jsonl}\ntrian: {epochs: 1}\n")
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", str(config)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"sft-launch: error: {config}: unknown key 'trian'. Did you mean 'train'?")


def test_missing_data_file_names_the_key(tmp_path, tokenizer_dir):
    raw = tiny_config(tmp_path, tokenizer_dir, data={"train_file": str(tmp_path / "none.jsonl")})
    proc = cli(write_config(tmp_path / "c.yaml", raw), "--dry-run")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"data.train_file: file {tmp_path / 'none.jsonl'} not found" in proc.stderr


def test_missing_column_names_file_and_columns(tmp_path, tokenizer_dir):
    data = tmp_path / "d.jsonl"
    data.write_text("".join('{"question": "q%d", "answer": "a"}\n' % i for i in range(10)))
    proc = cli(write_config(tmp_path / "c.yaml", tiny_config(tmp_path, tokenizer_dir, data={"train_file": str(data)})),
               "--dry-run")
    assert proc.returncode == 2
    assert "cannot tell the data format from its columns (found: question, answer)" in proc.stderr
    assert "pair: 'prompt' and 'response' (data.prompt_column, data.response_column)" in proc.stderr
    assert str(data) in proc.stderr


def test_freeze_rule_matching_nothing_fails_before_any_worker(tmp_path, tokenizer_dir):
    raw = tiny_config(tmp_path, tokenizer_dir, finetune={"mode": "local", "train": ["decoder.*"]})
    proc = cli(write_config(tmp_path / "c.yaml", raw), "--dry-run")
    assert proc.returncode == 2 and "finetune.train[0] = 'decoder.*' matches no parameter" in proc.stderr


def test_dry_run_prints_resolved_config_and_plan(tmp_path, tokenizer_dir):
    raw = tiny_config(tmp_path, tokenizer_dir, finetune={"mode": "local", "train_last_layers": 1})
    proc = cli(write_config(tmp_path / "c.yaml", raw), "--dry-run", "--set", "train.gradient_accumulation=2",
               "--nodes", "1", "--workers-per-node", "2")
    assert proc.returncode == 0, proc.stderr
    assert "gradient_accumulation: 2" in proc.stdout
    assert "world size 2 (1 node(s) x 2 worker(s)); micro batch 8 per worker x accumulation 2 = global batch 32" \
        in proc.stdout
    assert "12 optimizer steps" in proc.stdout and "blocks [.T]" in proc.stdout
    # 8 x 96 x 400 x 4 bytes x 3: well under auto's threshold
    assert ("logits per worker: 0.00 GiB at data.max_length (micro batch 8 x 96 tokens x vocab 400 x 4 bytes x 3 "
            "(logits, log-softmax, gradient)); train.loss_impl auto: standard on CPU workers") in proc.stdout
    assert not (tmp_path / "run").exists()  # a dry run starts and writes nothing


def test_dry_run_states_the_chunked_logits_and_refuses_liger_without_cuda(tmp_path, tokenizer_dir):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, tokenizer_dir))
    proc = cli(config, "--dry-run", "--set", "train.loss_impl=chunked")
    assert proc.returncode == 0, proc.stderr
    assert "one chunk of 768 positions at a time (train.loss_impl chunked); standard would hold" in proc.stdout
    proc = cli(config, "--dry-run", "--set", "train.loss_impl=liger", "--set", "scaling.gpus_per_worker=0")
    assert proc.returncode == 2 and "train.loss_impl: liger is liger-kernel's fused linear cross-entropy" in proc.stderr


def test_dry_run_shows_the_lora_layout(tmp_path, tokenizer_dir):
    """Adapters found by module type on GPT-2 (its Conv1D projections), counted on a meta skeleton."""
    raw = tiny_config(tmp_path, tokenizer_dir, finetune={"mode": "lora", "lora": {"r": 4}})
    proc = cli(write_config(tmp_path / "c.yaml", raw), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    # 2 blocks x (c_attn, attention c_proj, c_fc, mlp c_proj); r=4 adapters: (in + out) * 4 each
    assert "LoRA r=4 alpha=32 on 8 modules (c_attn, c_fc, c_proj)" in proc.stdout
    adapters = 2 * 4 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    assert f"trainable {adapters:,} / " in proc.stdout and "blocks [pp]" in proc.stdout


def test_lora_target_matching_nothing_fails_before_any_worker(tmp_path, tokenizer_dir):
    raw = tiny_config(tmp_path, tokenizer_dir, finetune={"mode": "lora", "lora": {"target": ["*q_proj"]}})
    proc = cli(write_config(tmp_path / "c.yaml", raw), "--dry-run")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "finetune.lora.target[0] = '*q_proj' matches no linear or convolution layer" in proc.stderr


@pytest.mark.parametrize("name, fmt", [("gpt_alpaca", "alpaca from 'instruction' + 'input' / 'output' (data.format)"),
                                       ("gpt_sharegpt", "sharegpt from 'conversations' ({from, value} turns) (data.format)")])
def test_the_shipped_alpaca_and_sharegpt_configs_read_their_data(tmp_path, tokenizer_dir, name, fmt):
    """The shipped configs and samples as they are, with the tiny model in place of SmolLM2 (and
    SmolLM2's chat template on the test tokenizer): every row of every split reads and renders."""
    raw = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    raw["data"]["train_file"] = str(REPO / "data" / Path(raw["data"]["train_file"]).name)
    raw["data"]["chat_template"] = SMOLLM2
    raw["model"] = tiny_config(tmp_path, tokenizer_dir)["model"]
    raw["model"]["architecture"]["n_positions"] = 512
    raw["output_dir"] = str(tmp_path / "run")
    proc = cli(write_config(tmp_path / "c.yaml", raw), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert f"data format: all splits: {fmt}; labels on every assistant turn (with end-of-turn marker)" in proc.stdout
