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


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 over a SQLite store in `root`; stop() and start() again on the
    same port and store (a server that goes away and comes back)."""

    def __init__(self, root: Path):
        import socket

        self.root = Path(root)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, timeout_s: float = 180) -> "MlflowServer":
        import os
        import subprocess
        import sys
        import time
        import urllib.request

        mlflow = Path(sys.executable).with_name("mlflow")
        log = open(self.root / "server.log", "a")
        self.proc = subprocess.Popen(
            [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1", "--port",
             str(self.port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
        raise RuntimeError("mlflow server did not answer in time")

    def stop(self) -> None:
        import os
        import signal

        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.proc = None


def wandb_records(run_file: Path, timeout_s: float = 60) -> list:
    """The records of a W&B run file (`run-<id>.wandb`, what offline mode writes and `wandb sync`
    uploads), parsed with W&B's own protobuf schema, once the run's exit record is in it (W&B's service
    process writes the file; a finished run's tail can land a moment after finish() returns). wandb 0.31
    reads these files in its Go core only, so the framing (LevelDB's log format: 32 KiB blocks, records
    of crc32, length, type) is read here."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        records = _wandb_records(run_file)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def _wandb_records(run_file: Path) -> list:
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block, pos, records, partial = Path(run_file).read_bytes(), 32768, 7, [], b""  # 7: the W&B header
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or a record's last fragment
            record = wandb_internal_pb2.Record()
            record.ParseFromString(partial + chunk)
            records.append(record)
            partial = b""
        else:  # first or middle fragment
            partial += chunk
    return records


def item_key(item) -> str:
    """A W&B record item's key: `key`, or `nested_key` for keys with a slash (train/loss)."""
    return item.key or "/".join(item.nested_key)


def wandb_history(run_file: Path, key: str) -> dict[int, float]:
    """step -> value of one logged key in a W&B run file."""
    found = {}
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            items = {item_key(i): i.value_json for i in record.history.item}
            if key in items:
                found[int(record.history.step.num)] = float(json.loads(items[key]))
    return found
