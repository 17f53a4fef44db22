"""Tiny real parts for tests: a tokenizer trained on the shipped data, and tiny model configs."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "sft_tiny.jsonl"
# SmolLM2-135M-Instruct's template as its GGUF ships it: injects a default system prompt.
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
           "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' "
           "+ message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
           "{{ '<|im_start|>assistant\n' }}{% endif %}")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args) -> CliResult:
    """`sft-launch ARGS` in this process (what a subprocess would show, without a cold import each time)."""
    import contextlib
    import io

    from launcher import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    return CliResult(code, out.getvalue(), err.getvalue())


def make_tokenizer(target: Path) -> Path:
    """A byte-level BPE tokenizer (vocab 400) trained on the shipped SFT data, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for line in DATA.read_text().splitlines():
        row = json.loads(line)
        texts += [row["prompt"], row["response"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|im_start|>")
    fast.chat_template = CHATML
    fast.save_pretrained(target)
    return target


def tiny_gpt2(n_layer: int = 2) -> dict:
    return {"model_type": "gpt2", "n_layer": n_layer, "n_embd": 32, "n_head": 2, "n_positions": 128,
            "vocab_size": 400, "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.0,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def tiny_llama(n_layer: int = 2) -> dict:
    return {"model_type": "llama", "num_hidden_layers": n_layer, "hidden_size": 32, "intermediate_size": 64,
            "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 400,
            "max_position_embeddings": 128, "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def save_pretrained_llama(target: Path, tokenizer_dir: Path, tied: bool = False) -> Path:
    """A tiny pretrained-style model folder (weights from seed 0): local and LoRA fine-tuning rebuild
    their frozen weights from it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    arch = {**tiny_llama(3), "tie_word_embeddings": tied}
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(arch.pop("model_type"), **arch)).save_pretrained(target)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(target)
    return target


def tiny_config(tmp: Path, tokenizer: Path, **sections) -> dict:
    raw = {
        "model": {"architecture": tiny_gpt2(), "tokenizer": str(tokenizer)},
        "data": {"train_file": str(DATA), "max_length": 96, "fractions": [0.8, 0.1, 0.1]},
        "finetune": {"mode": "global"},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "scheduler": "linear"},
        "train": {"max_steps": 12, "micro_batch_size": 8, "eval_every": 4, "save_every": 4, "keep_last": 2,
                  "log_every": 4},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"nodes": 1, "workers_per_node": 2, "cpus_per_worker": 1},
        # Generation adds ~1 s per causal_lm launch: off here, on where a test is about it (the zero3 run).
        "eval": {"generate": {"num_examples": 0, "test": False}},
        "output_dir": str(tmp / "run"),
        "seed": 7,
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(raw.get(section), dict):
            raw[section] = {**raw[section], **values}
        else:
            raw[section] = values
    return raw


def shouted_copy(tmp: Path, n: int = 80) -> str:
    """A second training source for mixes: the shipped SFT rows' first n, upper-cased."""
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[:n]]
    path = tmp / "shouted.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["prompt"].upper(), "response": r["response"].upper()}) + "\n"
                            for r in rows))
    return str(path)


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def make_wordpiece_tokenizer(target: Path) -> Path:
    """A BERT WordPiece tokenizer whose vocabulary is every word of the shipped classification data."""
    import re

    from transformers import BertTokenizerFast

    words = set()
    for name in ("topics.jsonl", "ner_tiny.jsonl", "srl_tiny.jsonl"):
        for line in (REPO / "data" / name).read_text().splitlines():
            row = json.loads(line)
            text = row.get("text") or " ".join(row.get("tokens", []))
            words |= set(re.findall(r"\w+|[^\w\s]", text.lower()))
    target.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words), *[f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]]
    (target / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(str(target / "vocab.txt")).save_pretrained(target)
    return target


def make_image_processor(target: Path, size: int = 32) -> Path:
    from transformers import ViTImageProcessor

    ViTImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(target)
    return target


def tiny_bert(vocab_size: int, n_layer: int = 2) -> dict:
    return {"model_type": "bert", "vocab_size": vocab_size, "hidden_size": 32, "num_hidden_layers": n_layer,
            "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 128}


def tiny_resnet() -> dict:
    """A two-stage ConvNet: learns the 8x8 digits within a few dozen steps (a tiny ViT from scratch does not)."""
    return {"model_type": "resnet", "num_channels": 3, "embedding_size": 16, "hidden_sizes": [16, 32],
            "depths": [1, 1], "layer_type": "basic"}


def task_config(tmp: Path, task: str, tokenizer: Path | None = None, processor: Path | None = None, **sections) -> dict:
    """A tiny 2-worker config for a classification task on the shipped data."""
    if task == "image_classification":
        model = {"architecture": tiny_resnet(), "image_processor": str(processor), "task": task}
        data = {"train_file": str(REPO / "data" / "digits.parquet")}
    else:
        vocab = len((tokenizer / "vocab.txt").read_text().split())
        model = {"architecture": tiny_bert(vocab), "tokenizer": str(tokenizer), "task": task}
        data = {"train_file": str(REPO / "data" / ("topics.jsonl" if task == "sequence_classification"
                                                   else "ner_tiny.jsonl")), "max_length": 64}
    raw = tiny_config(tmp, tokenizer or processor, model=model, data={**data, "fractions": [0.8, 0.1, 0.1]},
                      optim={"lr": 2e-3, "warmup_steps": 5, "scheduler": "linear"},
                      train={"max_steps": 60, "micro_batch_size": 16, "eval_every": 20, "save_every": 20,
                             "keep_last": 1, "log_every": 20})
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    return raw
