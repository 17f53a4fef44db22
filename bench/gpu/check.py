"""The GPU check: the project's own worker loop (trainer/loop.py::run) without Ray, case by case.

Each case runs in a fresh process (this file with --case): a one-process group (NCCL on the GPU,
gloo on the CPU) set up as torchrun would, the data prepared as the launcher does
(trainer/data_cache.py), then `loop.run` trains `--steps` steps in bf16 (fp32 on the CPU) with
gradient checkpointing and sdpa attention, validates and checkpoints once at the end, as every run
does. Models: SmolLM2-135M's shape (its config and tokenizer from the shipped GGUF, carried by
bench/gpu/fetch.sh; random weights, since its weights do not fit the 64 MiB a call carries) and a
~1.07B Llama built from config (the same tokenizer). Cases, in this order (the budget skips the tail):
  1. the loss cases (issue #26): train.loss_impl standard, chunked and liger (liger-kernel's fused
     linear cross-entropy, carried as a wheel) at --loss-lengths tokens (4,096 and 8,192),
     micro-batch --loss-micro-batch (2), global ZeRO-2 with packing (liger is refused under ZeRO-3);
     besides the table, their step-1 losses side by side (same weights, same batch: they must agree)
     and their peak memory and tokens/s over standard's;
  2. the mode cases at --max-length and --micro-batch: global, local and LoRA fine-tuning, ZeRO-2 and
     ZeRO-3 on one GPU, packing off and on, train.loss_impl auto (the table says what it resolved to:
     liger on CUDA where installed, not under ZeRO-3; else chunked above 256 MiB of logits).
Before a case starts, its config goes through the launcher's own checks (trainer/config_load.py's and
launcher/plan.py's check_model_fits): a case they refuse (liger without CUDA or without liger-kernel)
is listed as refused, with the launcher's message, and not run. A failing case prints its traceback;
the others go on. Not covered: all that needs more than one GPU or Ray (NCCL between GPUs, Ray's GPU
placement), the test phase and the export. Never imports ray; the loop's own modules do the work.

Prints one table, then the loss cases' comparison: train.loss_impl as resolved (chunked: with its chunk
count), real tokens/s per GPU (the loop's train/tokens_per_s: unpadded tokens, median
over the steps after the first two), MFU (6 * parameters * tokens/s over the dense bf16 peak,
--peak-tflops, 989 for an H100 or H200 SXM), peak GPU memory (torch.cuda.max_memory_allocated; on the CPU
the process's peak resident memory), the training loss at step 1 and at the last step, and the
case's wall time (start to exit: imports, model build, steps, validation, checkpoint).

    bash bench/gpu/run.sh [options]       # there: installs the carried wheels, then this file
    bash bench/gpu/rehearse.sh            # here: the same on the CPU, 2 steps, 2-layer models, short rows
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

# 8,192 positions, as SmolLM2-135M's own config has: the loss cases' longest rows.
LLAMA_1B = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 49152,
            "max_position_embeddings": 8192, "tie_word_embeddings": True}
MODELS = ("smollm2-135m", "llama-1b")
FINETUNE = {"global": {"mode": "global"}, "local": {"mode": "local", "train_last_layers": 2},
            "lora": {"mode": "lora"}}
LOSS_IMPLS = ("standard", "chunked", "liger")


@dataclass(frozen=True)
class Case:
    model: str  # smollm2-135m or llama-1b
    mode: str  # global, local or lora
    zero_stage: int
    packing: bool
    max_length: int | None = None  # a loss case's own (--loss-lengths); None: --max-length
    loss_impl: str = "auto"  # train.loss_impl

    @property
    def name(self) -> str:
        name = f"{self.model} {self.mode} zero{self.zero_stage} packing={'on' if self.packing else 'off'}"
        return (name + (f" len={self.max_length}" if self.max_length else "")
                + (f" loss={self.loss_impl}" if self.loss_impl != "auto" else ""))


def all_cases(loss_lengths: list[int]) -> list[Case]:
    """The loss cases (#26) first, model by model, length by length; then the mode cases."""
    loss = [Case(model, "global", 2, True, length, impl)
            for model in MODELS for length in loss_lengths for impl in LOSS_IMPLS]
    modes = [Case(model, mode, stage, packing) for model in MODELS
             for mode, stage, packing in (("global", 2, False), ("global", 2, True), ("global", 3, True),
                                          ("local", 2, True), ("lora", 2, True), ("lora", 3, True))]
    return loss + modes


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps of every case")
    p.add_argument("--micro-batch", type=int, default=16, help="the mode cases' micro-batch")
    p.add_argument("--max-length", type=int, default=1024, help="the mode cases' data.max_length")
    p.add_argument("--loss-lengths", type=int, nargs="+", default=[4096, 8192], metavar="TOKENS",
                   help="the loss cases' data.max_length values (issue #26)")
    p.add_argument("--loss-micro-batch", type=int, default=2, help="the loss cases' micro-batch")
    p.add_argument("--rows", type=int, default=6000, help="generated prompt/response rows (bench/throughput.py's)")
    p.add_argument("--layers", type=int, default=None, help="override both models' block count (the rehearsal)")
    p.add_argument("--only", nargs="+", default=[""], metavar="TEXT",
                   help="run only the cases whose name contains one of these texts")
    p.add_argument("--skip", nargs="+", default=[], metavar="TEXT",
                   help="leave out the cases whose name contains one of these texts (--skip len=: the mode cases)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads on the CPU")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of one GPU")
    p.add_argument("--backend", choices=("auto", "nccl", "gloo"), default="auto",
                   help="the process group's backend (auto: nccl on the GPU, gloo on the CPU)")
    p.add_argument("--case-timeout", type=float, default=150.0, help="seconds before a case is killed")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for all cases; later ones are skipped")
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
    on_cuda = opts["device"] == "cuda"
    return {
        "model": {"architecture": arch, "tokenizer": str(carry / "smollm2-135m"), "attn_implementation": "sdpa"},
        "data": {"train_file": opts["data_file"], "max_length": case.max_length or opts["max_length"],
                 "fractions": [0.9, 0.05, 0.05], "packing": case.packing,
                 "cache_dir": str(Path(opts["work"]) / "data-cache")},
        "finetune": FINETUNE[case.mode],
        "optim": {"lr": 2e-4, "warmup_steps": 2, "scheduler": "cosine"},
        "train": {"max_steps": steps, "eval_every": steps, "log_every": steps, "gradient_checkpointing": True,
                  "micro_batch_size": opts["loss_micro_batch"] if case.max_length else opts["micro_batch"],
                  "loss_impl": case.loss_impl},
        "eval": {"generate": {"num_examples": 0, "test": False}},
        "deepspeed": {"zero_stage": case.zero_stage, "precision": "bf16" if on_cuda else "fp32"},
        # what the launcher would resolve on this machine (its liger check reads it)
        "scaling": {"nodes": 1, "workers_per_node": 1, "gpus_per_worker": 1 if on_cuda else 0},
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


def refusal(case: Case, opts: dict) -> str | None:
    """Why the launcher would refuse this case's config here (None: it would start it): the config's own
    checks, then launcher/plan.py's check_model_fits (data.max_length within the model's positions;
    train.loss_impl liger only on CUDA with liger-kernel installed), as sft-launch runs them."""
    from launcher.plan import check_model_fits
    from trainer.config import ConfigError
    from trainer.config_load import from_dict
    from trainer.model import load_processor

    try:
        cfg = from_dict(raw_config(case, opts), where=case.name)
        check_model_fits(cfg, None, load_processor(cfg.model, None), [])
    except ConfigError as err:
        return str(err)
    return None


def run_case(case: Case, opts: dict) -> dict:
    """One case in this process: the loop's figures as a plain dict."""
    import importlib.util

    import torch

    from trainer import data_cache, loop
    from trainer.chunked_loss import loss_implementation
    from trainer.config_load import from_dict
    from trainer.lora import trainable_model
    from trainer.model import build_skeleton, load_processor

    started = time.perf_counter()
    process_group(opts["device"], opts["backend"])
    cfg = from_dict(raw_config(case, opts), where=case.name)
    skeleton, trainable = trainable_model(build_skeleton(cfg.model, None), cfg.finetune)
    # train.loss_impl as the worker resolves it (trainer/worker.py: the same function, the same inputs)
    impl = loss_implementation(cfg, skeleton.config, opts["device"] == "cuda",
                               importlib.util.find_spec("liger_kernel") is not None)
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
            "steps": len(speeds), "loss_impl": impl.name, "chunks": impl.chunks,
            "seconds": time.perf_counter() - started}


def case_main(name: str, work: Path) -> int:
    opts = json.loads((work / "options.json").read_text())
    case = next(c for c in all_cases(opts["loss_lengths"]) if c.name == name)
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
    names = ("transformers", "deepspeed", "datasets", "peft", "liger_kernel", "triton", "accelerate", "tokenizers",
             "huggingface_hub", "safetensors", "pyarrow", "pydantic", "numpy")
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

    cases = [c for c in all_cases(opts.loss_lengths)
             if any(text in c.name for text in opts.only) and not any(text in c.name for text in opts.skip)]
    rows, failures, refused, passed, began = [], [], 0, 0, time.perf_counter()
    results: dict[Case, dict] = {}
    for case in cases:
        if why := refusal(case, options):  # a second or so: the launcher's checks, no model built
            rows.append(f"| {case.name} | refused: {why} |||||||")
            print(rows[-1], flush=True)
            refused += 1
            continue
        left = opts.budget - (time.perf_counter() - began)
        if left < 20:
            rows.append(f"| {case.name} | skipped: the check's --budget of {opts.budget:.0f} s is spent |||||||")
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
            results[case] = figures
            passed += 1
            continue
        why = figures.get("error") or "".join(log.read_text().splitlines(keepends=True)[-40:])
        failures.append(f"### {case.name}: failed (exit {code})\n{why.rstrip()}")
        rows.append(f"| {case.name} | FAILED (exit {code}): see below |||||||")
        print(failures[-1], flush=True)

    memory = "peak GPU memory" if device == "cuda" else "peak RSS"
    print(f"\nsft GPU check: {opts.steps} steps, {'bf16' if device == 'cuda' else 'fp32'}, gradient checkpointing, "
          f"sdpa, one process ({time.perf_counter() - began:.0f} s); the loss cases (len=): micro-batch "
          f"{opts.loss_micro_batch}; the others: micro-batch {opts.micro_batch}, max_length {opts.max_length}")
    print(f"| case | loss_impl | real tokens/s per GPU | MFU | {memory} (GiB) | loss step 1 -> last | "
          f"params (trainable) | s |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if comparison := loss_comparison(results, memory):
        print("\n" + "\n".join(comparison))
    if failures:
        print("\n" + "\n\n".join(failures))
    skipped = len(cases) - passed - len(failures) - refused
    print(f"\n{passed} passed, {len(failures)} failed" + (f", {refused} refused" if refused else "")
          + (f", {skipped} skipped" if skipped else ""))
    return 1 if failures else 0


def table_row(case: Case, f: dict, device: str, peak_tflops: float) -> str:
    mfu = f"{100 * 6 * f['params'] * f['tokens_per_s'] / (peak_tflops * 1e12):.1f}%" if device == "cuda" else "-"
    impl = f["loss_impl"] + (f" ({f['chunks']} chunks)" if f["loss_impl"] == "chunked" else "")
    return (f"| {case.name} | {impl} | {f['tokens_per_s']:,.0f} | {mfu} | {f['peak_gib']:.1f} | "
            f"{f['loss_first']:.3f} -> {f['loss_last']:.3f} ({f['steps']}) | "
            f"{f['params'] / 1e6:,.0f}M ({f['trainable'] / 1e6:,.1f}M) | {f['seconds']:.0f} |")


def loss_comparison(results: dict[Case, dict], memory: str) -> list[str]:
    """The loss cases side by side, per model and length: the step-1 loss (the same weights and the same
    batch, so the three must agree to the precision's noise) and the peak memory and tokens/s over
    standard's."""
    lines = []
    for case, f in results.items():
        if case.loss_impl == "auto":
            continue
        base = results.get(Case(case.model, case.mode, case.zero_stage, case.packing, case.max_length, "standard"))

        def over(key: str) -> str:
            return f"{f[key] / base[key]:.2f}x" if base else "-"

        diff = f"{f['loss_first'] - base['loss_first']:+.2e}" if base and base is not f else "-"
        lines.append(f"| {case.model} len={case.max_length} | {case.loss_impl} | {f['loss_first']:.5f} | {diff} | "
                     f"{f['peak_gib']:.2f} | {over('peak_gib')} | {f['tokens_per_s']:,.0f} | {over('tokens_per_s')} |")
    if not lines:
        return []
    return ["loss cases (issue #26): step 1 on the same weights and batch; memory and speed over standard's",
            f"| model, tokens | loss_impl | loss step 1 | minus standard's | {memory} (GiB) | over standard's | "
            f"real tokens/s | over standard's |", "|---|---|---|---|---|---|---|---|"] + lines


if __name__ == "__main__":
    sys.exit(main())
