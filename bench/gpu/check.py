"""The GPU check: the project's own worker loop (trainer/loop.py::run) without Ray, case by case.

Each case runs in a fresh process (this file with --case): a one-process group (NCCL on the GPU,
gloo on the CPU) set up as torchrun would, the data prepared as the launcher does
(trainer/data_cache.py), then `loop.run` trains `--steps` steps in bf16 (fp32 on the CPU) with
gradient checkpointing and sdpa attention, validates and checkpoints once at the end, as every run
does. Cases: SmolLM2-135M's shape (its config and tokenizer from the shipped GGUF, carried by
bench/gpu/fetch.sh; random weights, since its weights do not fit the 64 MiB a call carries) and a
~1.07B Llama built from config (the same tokenizer); global, local and LoRA fine-tuning; ZeRO-2 and
ZeRO-3 on one GPU; packing off and on. A failing case prints its traceback; the others go on.
Not yet covered: the chunked/fused loss (issue #26 has not landed), and all that needs more than one
GPU or Ray (NCCL between GPUs, Ray's GPU placement). Never imports ray; the loop's own modules do the work.

Prints one table: real tokens/s per GPU (the loop's train/tokens_per_s: unpadded tokens, median
over the steps after the first two), MFU (6 * parameters * tokens/s over the dense bf16 peak,
--peak-tflops, 989 for an H200 SXM), peak GPU memory (torch.cuda.max_memory_allocated; on the CPU
the process's peak resident memory), the training loss at step 1 and at the last step, and the
case's wall time (start to exit: imports, model build, steps, validation, checkpoint).

    bash bench/gpu/run.sh [options]       # there: installs the carried wheels, then this file
    bash bench/gpu/rehearse.sh            # here: the same on the CPU, 2 steps, 2-layer models
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

LLAMA_1B = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 49152,
            "max_position_embeddings": 2048, "tie_word_embeddings": True}
FINETUNE = {"global": {"mode": "global"}, "local": {"mode": "local", "train_last_layers": 2},
            "lora": {"mode": "lora"}}


@dataclass(frozen=True)
class Case:
    model: str  # smollm2-135m or llama-1b
    mode: str  # global, local or lora
    zero_stage: int
    packing: bool

    @property
    def name(self) -> str:
        return f"{self.model} {self.mode} zero{self.zero_stage} packing={'on' if self.packing else 'off'}"


CASES = [Case(model, mode, stage, packing) for model in ("smollm2-135m", "llama-1b")
         for mode, stage, packing in (("global", 2, False), ("global", 2, True), ("global", 3, True),
                                      ("local", 2, True), ("lora", 2, True), ("lora", 3, True))]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--rows", type=int, default=6000, help="generated prompt/response rows (bench/throughput.py's)")
    p.add_argument("--layers", type=int, default=None, help="override both models' block count (the rehearsal)")
    p.add_argument("--only", nargs="+", default=[""], metavar="TEXT",
                   help="run only the cases whose name contains one of these texts")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads on the CPU")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of one GPU")
    p.add_argument("--backend", choices=("auto", "nccl", "gloo"), default="auto",
                   help="the process group's backend (auto: nccl on the GPU, gloo on the CPU)")
    p.add_argument("--case-timeout", type=float, default=150.0, help="seconds before a case is killed")
    p.add_argument("--budget", type=float, default=400.0, help="seconds for all cases; later ones are skipped")
    p.add_argument("--carry", default=str(REPO / "bench" / "gpu" / "carry"))
    p.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    p.add_argument("--logs", default=None, help="also copy each case's full log into this folder")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case, in this process
    return p


def raw_config(case: Case, opts: dict) -> dict:
    carry = Path(opts["carry"])
    if case.model == "smollm2-135m":
        arch = json.loads((carry / "smollm2-135m" / "config.json").read_text())
        for key in ("_model_name_or_path", "transformers_version", "architectures", "dtype", "use_cache"):
            arch.pop(key, None)
    else:
        arch = dict(LLAMA_1B)
    if opts["layers"]:
        arch["num_hidden_layers"] = opts["layers"]
    steps = opts["steps"]
    return {
        "model": {"architecture": arch, "tokenizer": str(carry / "smollm2-135m"), "attn_implementation": "sdpa"},
        "data": {"train_file": opts["data_file"], "max_length": opts["max_length"], "fractions": [0.9, 0.05, 0.05],
                 "packing": case.packing, "cache_dir": str(Path(opts["work"]) / "data-cache")},
        "finetune": FINETUNE[case.mode],
        "optim": {"lr": 2e-4, "warmup_steps": 2, "scheduler": "cosine"},
        "train": {"max_steps": steps, "micro_batch_size": opts["micro_batch"], "eval_every": steps,
                  "log_every": steps, "gradient_checkpointing": True},
        "eval": {"generate": {"num_examples": 0, "test": False}},
        "deepspeed": {"zero_stage": case.zero_stage, "precision": "bf16" if opts["device"] == "cuda" else "fp32"},
        "scaling": {"nodes": 1, "workers_per_node": 1},
        "output_dir": str(Path(opts["work"]) / "runs" / case.name.replace(" ", "_")),
        "seed": 42,
    }


class Recorder:
    """The Reporter the loop talks to: keeps the messages, leaves the checkpoint where the loop wrote it
    (a temporary folder it removes; the 1B model's weights and optimizer states are ~15 GB)."""

    def __init__(self):
        self.messages, self.tracked = [], []

    def report(self, message, checkpoint=None):
        self.messages.append(message)

    def log(self, text, after_training=False):
        print(f"[sft] {text}", flush=True)

    def track(self, metrics):
        self.tracked.append(metrics)  # the per-step metrics the controller would write


def process_group(device: str, backend: str) -> None:
    """What torchrun would set up for one process."""
    import torch
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device == "cuda":
        torch.cuda.set_device(0)
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # as the Ray worker does without a GPU
    if backend == "auto":
        backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def run_case(case: Case, opts: dict) -> dict:
    """One case in this process: the loop's figures as a plain dict."""
    import torch

    from trainer import data_cache, loop
    from trainer.config_load import from_dict
    from trainer.lora import trainable_model
    from trainer.model import build_skeleton, load_processor

    started = time.perf_counter()
    process_group(opts["device"], opts["backend"])
    cfg = from_dict(raw_config(case, opts), where=case.name)
    skeleton, trainable = trainable_model(build_skeleton(cfg.model, None), cfg.finetune)
    sizes = {n: p.numel() for n, p in skeleton.named_parameters()}
    base = sum(n for name, n in sizes.items() if "lora_" not in name)
    # The launcher prepares the data once, before the workers start; the cases share what it wrote.
    prepared = data_cache.prepare(cfg, load_processor(cfg.model, None), data_cache.cache_root(cfg))
    args = loop.WorkerArgs(cache_dir=str(Path(opts["work"]) / "cache"), data_dir=str(prepared.directory),
                           threads=opts["threads"])
    recorder = Recorder()
    loop.run(cfg, recorder, args)

    series = {tag: [m.scalars[tag] for m in sorted(recorder.tracked, key=lambda m: m.step)]
              for tag in ("train/tokens_per_s", "train/loss")}
    speeds = series["train/tokens_per_s"]
    if opts["device"] == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux
    return {"tokens_per_s": statistics.median(speeds[2:] if len(speeds) > 3 else speeds), "params": base,
            "trainable": sum(sizes[n] for n in trainable), "peak_gib": peak,
            "loss_first": series["train/loss"][0], "loss_last": series["train/loss"][-1],
            "steps": len(speeds), "seconds": time.perf_counter() - started}


def case_main(name: str, work: Path) -> int:
    opts = json.loads((work / "options.json").read_text())
    case = next(c for c in CASES if c.name == name)
    result = work / "results" / f"{name.replace(' ', '_')}.json"
    try:
        figures = run_case(case, opts)
    except BaseException:
        result.write_text(json.dumps({"error": traceback.format_exc()}))
        raise
    result.write_text(json.dumps(figures))
    return 0


def header(device: str, scratch: str) -> list[str]:
    """Where everything came from: the carried versions must be the ones imported."""
    import importlib.metadata
    import importlib.util

    import torch

    lines = [f"python {sys.version.split()[0]}  torch {torch.__version__}  device {device}"
             + (f" ({torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda})" if device == "cuda" else "")]
    names = ("transformers", "deepspeed", "datasets", "peft", "accelerate", "tokenizers", "huggingface_hub",
             "safetensors", "pyarrow", "pydantic", "numpy")
    for name in names:
        spec = importlib.util.find_spec(name)
        where = Path(spec.origin).parents[1] if spec and spec.origin else "missing"
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "?"
        lines.append(f"  {name} {version}  from {where}")
    lines.append(f"  trainer from {Path(importlib.util.find_spec('trainer').origin).parent}")
    usage = shutil.disk_usage(scratch)
    lines.append(f"  checkpoints written under {scratch} ({usage.free / 2 ** 30:.0f} GiB free)")
    return lines


def roomiest_scratch() -> str:
    """Where the loop's temporary checkpoint goes: /dev/shm when it has more room than the disk's /tmp."""
    candidates = [tempfile.gettempdir()] + (["/dev/shm"] if os.path.isdir("/dev/shm") else [])
    return max(candidates, key=lambda path: shutil.disk_usage(path).free)


def main(argv: list[str] | None = None) -> int:
    opts = parser().parse_args(argv)
    if opts.case:
        return case_main(opts.case, Path(opts.work))
    import torch

    from bench.throughput import dolly_like_rows
    from launcher.ray_job import WORKER_ENV  # the allocator setting sft gives its Ray workers

    device = ("cuda" if torch.cuda.is_available() else "cpu") if opts.device == "auto" else opts.device
    work = Path(opts.work or tempfile.mkdtemp(prefix="sft-gpu-check-"))
    (work / "results").mkdir(parents=True, exist_ok=True)
    data_file = work / "dolly_like.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in dolly_like_rows(opts.rows)))
    options = {**vars(opts), "device": device, "work": str(work), "data_file": str(data_file)}
    (work / "options.json").write_text(json.dumps(options))
    scratch = roomiest_scratch()
    print("\n".join(header(device, scratch)), flush=True)
    env = {**os.environ, **{k: os.environ.get(k, v) for k, v in WORKER_ENV.items()}, "TMPDIR": scratch}

    cases = [c for c in CASES if any(text in c.name for text in opts.only)]
    rows, failures, passed, began = [], [], 0, time.perf_counter()
    for case in cases:
        left = opts.budget - (time.perf_counter() - began)
        if left < 20:
            rows.append(f"| {case.name} | skipped: the check's --budget of {opts.budget:.0f} s is spent |||||")
            continue
        print(f"--- {case.name}", flush=True)
        log = work / "results" / f"{case.name.replace(' ', '_')}.log"
        result = log.with_suffix(".json")
        try:
            with log.open("w") as out:
                # stdin from /dev/null: a case started from a background shell job was stopped (SIGTTIN).
                code = subprocess.run([sys.executable, __file__, "--case", case.name, "--work", str(work)], env=env,
                                      stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                      timeout=min(opts.case_timeout, left)).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        figures = json.loads(result.read_text()) if result.is_file() else {}
        if opts.logs:
            Path(opts.logs).mkdir(parents=True, exist_ok=True)
            shutil.copy(log, opts.logs)
        if code == 0 and "error" not in figures:
            rows.append(table_row(case, figures, device, opts.peak_tflops))
            print(rows[-1], flush=True)
            passed += 1
            continue
        why = figures.get("error") or "".join(log.read_text().splitlines(keepends=True)[-40:])
        failures.append(f"### {case.name}: failed (exit {code})\n{why.rstrip()}")
        rows.append(f"| {case.name} | FAILED (exit {code}): see below |||||")
        print(failures[-1], flush=True)

    memory = "peak GPU memory" if device == "cuda" else "peak RSS"
    print(f"\nsft GPU check: {opts.steps} steps, micro-batch {opts.micro_batch}, max_length {opts.max_length}, "
          f"{'bf16' if device == 'cuda' else 'fp32'}, gradient checkpointing, sdpa, one process "
          f"({time.perf_counter() - began:.0f} s)")
    print(f"| case | real tokens/s per GPU | MFU | {memory} (GiB) | loss step 1 -> last | params (trainable) | s |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if failures:
        print("\n" + "\n\n".join(failures))
    skipped = len(cases) - passed - len(failures)
    print(f"\n{passed} passed, {len(failures)} failed" + (f", {skipped} skipped" if skipped else ""))
    return 1 if failures else 0


def table_row(case: Case, f: dict, device: str, peak_tflops: float) -> str:
    mfu = f"{100 * 6 * f['params'] * f['tokens_per_s'] / (peak_tflops * 1e12):.1f}%" if device == "cuda" else "-"
    return (f"| {case.name} | {f['tokens_per_s']:,.0f} | {mfu} | {f['peak_gib']:.1f} | "
            f"{f['loss_first']:.3f} -> {f['loss_last']:.3f} ({f['steps']}) | "
            f"{f['params'] / 1e6:,.0f}M ({f['trainable'] / 1e6:,.1f}M) | {f['seconds']:.0f} |")


if __name__ == "__main__":
    sys.exit(main())
