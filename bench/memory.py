"""Peak memory per training worker for each ZeRO stage, as a user runs sft-launch.

For every (stage, workers, fine-tuning mode) it launches the real command on a config (default: the
shipped SmolLM2-135M config), samples every Ray Train worker's resident memory from /proc (CPU
machines) every 0.2 s, and reports the peak during setup (before the first step), during the
steps (with the last validation and checkpoint), during the test evaluation that follows in the
same workers and during rank 0's export (from the line that says the test engine is released to the
end), next to the model-state estimate that `--dry-run` prints; also the trainable parameters, the
median seconds per step and the test loss after the run (mode lora: LoRA r=16 at lr 1e-3; global and
local at the config's rate). Peaks are of resident memory (VmRSS) and of anonymous memory (RssAnon:
the process's own, without memory-mapped files such as the checkpoint shards the export reads).
`--phases` prints one row per phase and the whole run's peak with the ratios issue #27 names: to
ZeRO-0's whole run on the same job, and to the run's own training-steps peak. Not a test: run it by hand.

    .venv/bin/python bench/memory.py                       # the full matrix (about 25 minutes here)
    .venv/bin/python bench/memory.py --stages 0 2 3 --workers 2 --modes global
    .venv/bin/python bench/memory.py --stages 2 --workers 2 --modes global local lora --steps 12
    .venv/bin/python bench/memory.py --stages 0 3 --workers 2 --modes global --phases   # issue #27
    .venv/bin/python bench/memory.py --stages 0 3 --workers 2 --modes global --phases --spawn   # no Ray
    .venv/bin/python bench/memory.py --loss-impls standard chunked --hf --max-length 2048 1024 \
        --modes lora global --workers 1 --steps 4      # issue #26: the training phase, vs HF Trainer

--spawn runs the same worker loop (trainer/loop.py fine_tune: train, test, export) in processes of
torch.multiprocessing with gloo, as tests/loop does, instead of sft-launch's Ray Train workers: no
Ray worker's own memory, no controller; the same phases, read from the same console lines.

--loss-impls runs that loop (training only) per train.loss_impl, data.max_length and mode, at
micro-batch 1 with gradient checkpointing, on generated rows longer than any length (every sequence is
data.max_length tokens), and with --hf HF Trainer + DeepSpeed on the same job (bench/hf_trainer.py
under torchrun); it reports the training phase's peak per worker (first step to the end of the last)
and tokens/s, with the ratios issue #26 names.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's trainer/ and launcher/, not the installed one
VARIANTS = {"0": (0, "none"), "1": (1, "none"), "2": (2, "none"), "3": (3, "none"), "3+offload": (3, "cpu")}


def parent(pid: int) -> int:
    """The parent's pid (0 when gone); the command name in /proc/PID/stat may hold spaces."""
    try:
        return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def descends_from(pid: int, root: int) -> bool:
    while pid > 1:
        if pid == root:
            return True
        pid = parent(pid)
    return False


PHASES = ("setup", "steps", "test", "export")


def worker_memory_mb(root: int, title: bytes = b"RayTrainWorker", exclude: bytes | None = None
                     ) -> dict[int, tuple[float, float]]:
    """(resident, anonymous) memory of every Ray Train worker process of the launch `root` now (they
    are titled ray::RayTrainWorker...; the launch's private Ray instance makes them its descendants).
    Other launches on the same machine are not counted; nor are processes whose command line holds
    `exclude` (torchrun's own agent, whose command line names the script too)."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            if title not in cmdline or (exclude and exclude in cmdline) or not descends_from(int(proc.name), root):
                continue
            status = {l.split(":")[0]: l for l in (proc / "status").read_text().splitlines()}
            out[int(proc.name)] = (int(status["VmRSS"].split()[1]) / 1024, int(status["RssAnon"].split()[1]) / 1024)
        except (OSError, KeyError):
            pass
    return out


def overrides(stage: int, offload: str, workers: int, mode: str, steps: int) -> list[str]:
    finetune = {"global": "{mode: global}", "local": "{mode: local, train_last_layers: 2}",
                "lora": "{mode: lora}"}[mode]
    # LoRA at configs/gpt_lora.yaml's rate (adapters take a larger one); the others at the config's.
    sets = (["optim.lr=1.0e-3"] if mode == "lora" else []) + [f"deepspeed.zero_stage={stage}", f"deepspeed.offload={offload}", f"scaling.workers_per_node={workers}",
            f"finetune={finetune}", f"train.max_steps={steps}", f"train.eval_every={steps}", "train.log_every=1",
            "train.micro_batch_size=2"]
    return [a for s in sets for a in ("--set", s)]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by "
         "word but not what all were we when your can said there use an each which she do how their if will up "
         "other about out many then them these so some her would make like him into time has look two more write "
         "go see number no way could people my than first water been call who oil its now find long down day did "
         "get come made may part").split()


def long_rows(n: int, words: int, seed: int = 0) -> list[dict]:
    """Prompt/response rows longer than any data.max_length asked for (`words` words of response,
    about a token each): truncation makes every example exactly data.max_length tokens, so sft and
    HF Trainer train on the same sequences with no padding and packing changes nothing. Short prompts:
    nearly every position is labelled (what the chunked loss computes; standard computes all)."""
    rng = random.Random(seed)
    return [{"prompt": " ".join(rng.choices(WORDS, k=rng.randint(10, 40))) + "?",
             "response": " ".join(rng.choices(WORDS, k=words)) + "."} for _ in range(n)]


def loss_overrides(data: Path, length: int, mode: str, impl: str, workers: int, steps: int) -> list[str]:
    finetune = {"global": "{mode: global}", "local": "{mode: local, train_last_layers: 2}",
                "lora": "{mode: lora}"}[mode]
    sets = (["optim.lr=1.0e-3"] if mode == "lora" else []) + [
        f"data.train_file={json.dumps(str(data))}", f"data.max_length={length}", "data.packing=false",
        "data.fractions=[0.9, 0.05, 0.05]",
        f"finetune={finetune}", f"scaling.workers_per_node={workers}", "train.micro_batch_size=1",
        "train.gradient_accumulation=1", "train.gradient_checkpointing=true", f"train.loss_impl={impl}",
        f"train.max_steps={steps}", f"train.eval_every={steps}", "train.log_every=1",
        "eval.generate.num_examples=0"]  # the last step's validation: loss only (it is not measured)
    return [a for s in sets for a in ("--set", s)]


def by_loss(a) -> None:
    """Issue #26's table: the training phase's peak memory per worker and real tokens/s of the causal-LM
    loss implementations (train.loss_impl) and of HF Trainer + DeepSpeed on the same job, per
    data.max_length and fine-tuning mode: micro-batch 1, gradient checkpointing on, the config's ZeRO
    stage, every sequence data.max_length tokens. sft runs its worker loop in spawned processes
    (--spawn's, training only), HF Trainer under torchrun; both with sft's allocator setting."""
    from trainer.chunked_loss import CHUNK_BYTES

    rows = []
    with tempfile.TemporaryDirectory(prefix="sft-bench-loss-") as tmp:
        data = Path(tmp) / "long_rows.jsonl"
        n = max(20, 2 * a.steps * a.workers[0])  # 90% train (enough for the steps); 1 validation row or so
        data.write_text("".join(json.dumps(r) + "\n" for r in long_rows(n, int(max(a.max_length) * 1.3))))
        impls = [*a.loss_impls, *(["hf"] if a.hf and "hf" not in a.loss_impls else [])]
        print(f"{'tokens':>6} {'mode':<7} {'impl':<10} {'setup MB':>9} {'train peak RSS/anon MB':>23} "
              f"{'s/step':>7} {'tokens/s':>9}", flush=True)
        for length in a.max_length:
            for mode in a.modes:
                for impl in impls:
                    sets = loss_overrides(data, length, mode, "standard" if impl == "hf" else impl, a.workers[0],
                                          a.steps)
                    r = measure(Path(a.config), sets, spawn=True, workers=a.workers[0], hf=impl == "hf",
                                test_after=False)
                    # Every micro-batch is `length` tokens: tokens/s from the median step time (the
                    # console lines round tokens/s to whole numbers).
                    r["tokens_per_s"] = length * a.workers[0] / r["s_per_step"]
                    rows.append({"tokens": length, "mode": mode, "impl": impl, **{k: v for k, v in r.items()
                                                                                   if k != "test_parts"}})
                    print(f"{length:>6} {mode:<7} {impl:<10} {r['setup']:>9,.0f} "
                          f"{r['train']:>12,.0f} / {r['train_anon']:>8,.0f} {r['s_per_step']:>7.2f} "
                          f"{r['tokens_per_s']:>9,.1f}", flush=True)
    vocab = 49152  # SmolLM2's; the logits column is for the shipped model
    name = {"standard": "standard", "chunked": "chunked", "hf": "HF Trainer + DeepSpeed"}
    print(f"\n{a.workers[0]} worker(s), micro-batch 1, gradient checkpointing, {a.steps} steps (median after the "
          f"first); peaks: the largest worker's, MB; logits of a micro-batch, fp32: {vocab:,} x tokens x 4 bytes "
          f"(chunks of {CHUNK_BYTES / 2**20:.0f} MiB)")
    print("| tokens | mode | loss | train peak RSS MB | anon MB | s/step | tokens/s | peak / standard "
          "| peak / HF Trainer | tokens/s / standard |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        same = {x["impl"]: x for x in rows if x["tokens"] == r["tokens"] and x["mode"] == r["mode"]}
        ratio = lambda key, base: f"{r[key] / same[base][key]:.2f}" if base in same else "-"  # noqa: E731
        print(f"| {r['tokens']:,} | {r['mode']} | {name[r['impl']]} | {r['train']:,.0f} | {r['train_anon']:,.0f} | "
              f"{r['s_per_step']:.2f} | {r['tokens_per_s']:,.1f} | {ratio('train', 'standard')} | {ratio('train', 'hf')} | "
              f"{ratio('tokens_per_s', 'standard')} |")


def spawned(config: str, sets: list[str], out: str, workers: int, test_after: bool = True) -> None:
    """--spawn: the worker loop in `workers` processes (gloo), as tests/loop runs it; no Ray.
    test_after False: training only (with its last validation and checkpoint), no test or export."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(workers, port, config, sets, out, test_after), nprocs=workers, join=True)


def _worker(rank: int, world: int, port: int, config: str, sets: list[str], out: str, test_after: bool) -> None:
    from datetime import timedelta

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    import torch.distributed as dist

    from launcher.cli import cache_dir
    from trainer.config_load import load_config
    from trainer.jobs import WorkerArgs
    from trainer.loop import fine_tune
    from trainer.report import ListReporter

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=1800))
    root = Path(out) / "ckpt"
    fine_tune(load_config(config, sets), ListReporter(root) if rank == 0 else _Quiet(root), WorkerArgs(
        cache_dir=cache_dir(), checkpoint_root=str(root), export_dir=str(Path(out) / "final_model"),
        test_after=test_after))
    dist.barrier()
    os._exit(0)


class _Quiet:
    """The other ranks' reporter: keeps their checkpoint shards, prints nothing."""

    def __init__(self, root: Path):
        from trainer.report import ListReporter

        self.inner = ListReporter(root)

    def report(self, message, checkpoint=None):
        self.inner.report(message, checkpoint)

    def log(self, text, after_training=False):
        pass

    def track(self, metrics):
        pass


def measure(config: Path, args: list[str], spawn: bool = False, workers: int = 2, hf: bool = False,
            test_after: bool = True) -> dict:
    """One launch: per-worker peaks (MB) of each phase, resident (phase name) and anonymous (name + "_anon");
    "train": from the first training step to the end of the last (before its validation and checkpoint).
    hf: the same job run by HF Trainer + DeepSpeed under torchrun (bench/hf_trainer.py; training only).
    test_after False (with spawn): no test evaluation or export after the training."""
    with tempfile.TemporaryDirectory(prefix="sft-bench-") as out:
        # PYTHONPATH: Ray's workers import this checkout, not the one the package was installed from.
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        if hf:
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(workers),
                       "--master_port", str(free_port()), str(REPO / "bench" / "hf_trainer.py"), str(config), *args]
        elif spawn:
            command = [sys.executable, __file__, "--spawned", out, "--config", str(config), "--workers", str(workers),
                       *([] if test_after else ["--no-test"]), *args]
        else:
            command = [sys.executable, "-m", "launcher.cli", str(config), "--output", out, *args]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path,
                                     # what sft-launch gives its Ray workers (launcher/ray_job.py); HF
                                     # Trainer gets the same so that both sides' allocators behave alike
                                     **({"MALLOC_MMAP_THRESHOLD_": "65536"} if spawn or hf else {})})
        title, exclude = (b"bench/hf_trainer.py", b"torch.distributed.run") if hf else (
            (b"spawn_main" if spawn else b"RayTrainWorker"), None)
        phase, part, done = ["setup"], ["test: build"], threading.Event()
        training = [False]  # between the "training steps" line and the last step's line
        peaks = {name: {} for p in (*PHASES, "train") for name in (p, p + "_anon")}
        parts: dict[str, dict] = {}  # within the test phase: the peak (RSS, anon) between its console lines

        def note(rss: float, anon: float) -> None:
            if phase[0] == "test":
                old = parts.setdefault(part[0], (0.0, 0.0))
                parts[part[0]] = (max(old[0], rss), max(old[1], anon))

        def sample():
            while not done.is_set():
                for pid, (rss, anon) in worker_memory_mb(proc.pid, title, exclude).items():
                    now = (phase[0], *(("train",) if training[0] else ()))
                    for name, mb in ((p + suffix, v) for p in now for suffix, v in (("", rss), ("_anon", anon))):
                        peaks[name][pid] = max(peaks[name].get(pid, 0.0), mb)
                    note(rss, anon)
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        lines, seconds, rates, last = [], [], [], [None]
        for line in proc.stdout:
            lines.append(line)
            if " s/step" in line:
                seconds.append(float(line.rsplit(" s/step", 1)[0].split()[-1]))
                if " tokens/s" in line:
                    rates.append(float(line.rsplit(" tokens/s", 1)[0].split()[-1].replace(",", "")))
            if (spawn or hf) and ("[sft]" in line or "[hf]" in line or "Error" in line):
                print("   ", line.rstrip(), flush=True)
            if (found := re.search(r"\[(sft|hf)\] training steps \d+\.\.(\d+) ", line)):
                phase[0], training[0], last[0] = "steps", True, found.group(2)
            elif last[0] and f" step {last[0]}/{last[0]} " in line:
                training[0] = False  # the last step is done; its validation and checkpoint follow
            if "[sft] training steps" in line:
                phase[0] = "steps"
            elif "[sft] test evaluation" in line:
                phase[0] = "test"  # a fresh model and engine for the test split, in the same workers
            elif "test engine released" in line:
                phase[0] = "export"  # rank 0 exports; the others wait (trainer/loop.py run_test)
            elif "test phase: the model and engine built" in line:
                part[0] = "test: before fine-tuning (evaluate, answer)"
            elif "test phase: the model before fine-tuning evaluated" in line:
                part[0] = "test: final checkpoint (load, evaluate, answer)"
        code = proc.wait()
        done.set()
        sampler.join()
        if code != 0:
            raise SystemExit(f"sft-launch failed ({code}):\n{''.join(lines[-30:])}")
        peak = {k: max(v.values(), default=0.0) for k, v in peaks.items()}
        peak["test_parts"] = parts
        after_first = lambda xs: statistics.median(xs[1:] if len(xs) > 1 else xs) if xs else float("nan")  # noqa: E731
        if spawn or hf:
            return {**peak, "s_per_step": after_first(seconds), "tokens_per_s": after_first(rates)}
        summary = json.loads((Path(out) / "run_summary.json").read_text())
    return {**peak,
            "checkpoint_mb": max(summary["checkpoint_bytes"].values()) / 2**20,
            "trainable": summary["trainable_parameters"], "test_loss": summary["test"]["after"]["loss"],
            "s_per_step": statistics.median(seconds[1:] if len(seconds) > 1 else seconds)}


def estimate_mb(config: Path, args: list[str]) -> float:
    """The model-state estimate --dry-run prints (the plan of the same config and overrides)."""
    from launcher.cli import cache_dir, parser, resolve
    from launcher.plan import make_plan
    from trainer.ds_config import model_state_bytes

    cfg = resolve(parser().parse_args([str(config), *args]))
    plan = make_plan(cfg, cache_dir())
    return sum(model_state_bytes(plan.total, plan.trainable, cfg.deepspeed.zero_stage, plan.world_size,
                                 "fp32").values()) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs" / "gpt_ft.yaml"))
    p.add_argument("--stages", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    p.add_argument("--modes", nargs="+", default=["global", "local"], choices=["global", "local", "lora"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1, help="launches per cell; the table shows the median")
    p.add_argument("--phases", action="store_true", help="one row per phase, RSS and anonymous, with issue #27's ratios")
    p.add_argument("--spawn", action="store_true", help="with --phases: the worker loop in spawned processes, no Ray")
    p.add_argument("--loss-impls", nargs="+", choices=["standard", "chunked", "hf"],
                   help="issue #26: the training phase per train.loss_impl (micro-batch 1, gradient "
                        "checkpointing, spawned workers, no Ray); with --max-length; hf: HF Trainer's alone")
    p.add_argument("--max-length", nargs="+", type=int, default=[1024, 2048], help="with --loss-impls")
    p.add_argument("--hf", action="store_true", help="with --loss-impls: HF Trainer + DeepSpeed on the same job")
    p.add_argument("--spawned", help=argparse.SUPPRESS)  # the --spawn child: its output folder
    p.add_argument("--no-test", action="store_true", help=argparse.SUPPRESS)  # the --spawn child: training only
    p.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.spawned:
        return spawned(a.config, a.set, a.spawned, a.workers[0], not a.no_test)
    if a.loss_impls:
        return by_loss(a)
    if a.phases:
        return by_phase(a)
    rows = []
    print(f"{'stage':<10} {'workers':>7} {'mode':<7} {'setup peak MB':>14} {'step peak MB':>13} "
          f"{'estimate MB':>12} {'step/ZeRO-0':>12} {'checkpoint MB':>14} {'test peak MB':>13} {'trainable':>11} "
          f"{'s/step':>7} {'test loss':>9}", flush=True)
    baseline: dict[tuple, float] = {}
    for workers in a.workers:
        for mode in a.modes:
            for name in a.stages:
                stage, offload = VARIANTS[name]
                args = overrides(stage, offload, workers, mode, a.steps)
                runs = [measure(Path(a.config), args) for _ in range(a.rounds)]
                setup = statistics.median(r["setup"] for r in runs)
                steps = statistics.median(r["steps"] for r in runs)
                if name == "0":
                    baseline[(workers, mode)] = steps
                ratio = steps / baseline[(workers, mode)] if (workers, mode) in baseline else float("nan")
                ckpt = statistics.median(r["checkpoint_mb"] for r in runs)
                test = statistics.median(r["test"] for r in runs)
                rows.append((name, workers, mode, setup, steps, estimate_mb(Path(a.config), args), ratio))
                print(f"{name:<10} {workers:>7} {mode:<7} {setup:>14,.0f} {steps:>13,.0f} {rows[-1][5]:>12,.0f} "
                      f"{ratio:>12.2f} {ckpt:>14,.0f} {test:>13,.0f} {runs[0]['trainable']:>11,} "
                      f"{statistics.median(r['s_per_step'] for r in runs):>7.2f} "
                      f"{statistics.median(r['test_loss'] for r in runs):>9.4f}", flush=True)


def by_phase(a) -> None:
    """Issue #27's table: per launch the peak of each phase (RSS / anonymous, MB, the largest worker),
    the whole run's peak, and its ratios to ZeRO-0's whole run (same workers and mode) and to the
    launch's own training-steps peak."""
    print(f"{'stage':<10} {'workers':>7} {'mode':<7} " + " ".join(f"{p + ' RSS/anon MB':>22}" for p in PHASES)
          + f" {'whole run RSS/anon':>20} {'whole/ZeRO-0':>13} {'whole/own steps':>16}", flush=True)
    baseline: dict[tuple, float] = {}
    for workers in a.workers:
        for mode in a.modes:
            for name in a.stages:
                stage, offload = VARIANTS[name]
                runs = [measure(Path(a.config), overrides(stage, offload, workers, mode, a.steps), a.spawn, workers)
                        for _ in range(a.rounds)]
                peak = {k: statistics.median(r[k] for r in runs) for p in PHASES for k in (p, p + "_anon")}
                whole = max(peak[p] for p in PHASES)
                whole_anon = max(peak[p + "_anon"] for p in PHASES)
                if name == "0":
                    baseline[(workers, mode)] = whole
                zero0 = whole / baseline[(workers, mode)] if (workers, mode) in baseline else float("nan")
                pair = lambda rss, anon: f"{rss:,.0f} / {anon:,.0f}"  # noqa: E731
                print(f"{name:<10} {workers:>7} {mode:<7} "
                      + " ".join(f"{pair(peak[p], peak[p + '_anon']):>22}" for p in PHASES)
                      + f" {pair(whole, whole_anon):>20} {zero0:>13.2f} {whole / peak['steps']:>16.2f}", flush=True)
                for part, (rss, anon) in runs[0]["test_parts"].items():  # the first launch's, any worker
                    print(f"{'':<10} {'':>7} {'':<7}   {part}: {pair(rss, anon)}", flush=True)


if __name__ == "__main__":
    main()
