"""Tiny real parts for tests: a tokenizer trained on the shipped data, and tiny model configs."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "sft_tiny.jsonl"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


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
        "output_dir": str(tmp / "run"),
        "seed": 7,
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(raw.get(section), dict):
            raw[section] = {**raw[section], **values}
        else:
            raw[section] = values
    return raw


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path
