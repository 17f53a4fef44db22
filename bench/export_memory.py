"""Peak memory of rank 0's export alone (#27), the streamed way against the whole-model way, without Ray.

Trains a two-rank checkpoint of the config (default: the shipped SmolLM2-135M config, finetune.mode
global, ZeRO-3, micro-batch 2, one step; torch.multiprocessing + gloo, as tests/loop does), then runs
each export in a fresh process and reports its peak resident memory (VmHWM) and peak anonymous memory
(RssAnon, sampled every 0.05 s): `streamed` is trainer/export.py's export_model, `built` its
export_built (the export before #27: the whole model built, filled from the consolidated fp32 state
dict, save_pretrained). Not a test: run it by hand.

    .venv/bin/python bench/export_memory.py
    .venv/bin/python bench/export_memory.py --set deepspeed.zero_stage=0 --dtype bf16
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETS = ["finetune={mode: global}", "deepspeed.zero_stage=3", "scaling.workers_per_node=2", "train.max_steps=1",
        "train.eval_every=1", "train.save_every=1", "train.micro_batch_size=2",
        "eval.generate={num_examples: 0, test: false}"]


def _train(rank: int, port: int, config: str, sets: list[str], out: str) -> None:
    from datetime import timedelta

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    import torch.distributed as dist

    from trainer.config_load import load_config
    from trainer.loop import WorkerArgs, run
    from trainer.report import ListReporter

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=600))
    reporter = ListReporter(Path(out) / "ckpt")
    run(load_config(config, sets), reporter, WorkerArgs(cache_dir=cache_dir(), threads=1))
    dist.barrier()
    if rank == 0:
        (Path(out) / "checkpoint.txt").write_text(str(reporter.calls[-1][1]))
    os._exit(0)


def cache_dir() -> str:
    return os.environ.get("SFT_CACHE_DIR") or str(Path.home() / ".cache" / "sft")


def export_once(config: str, sets: list[str], checkpoint: str, target: str, how: str, dtype: str) -> None:
    """In this process: one export (the parent measures it)."""
    from trainer.config_load import load_config
    from trainer.export import export_built, export_model
    from trainer.model import load_processor, prepare_pretrained

    cfg = load_config(config, sets)
    processor = load_processor(cfg.model, prepare_pretrained(cfg.model, cache_dir()))
    start = time.perf_counter()
    if how == "streamed":
        assert export_model(cfg, Path(checkpoint), Path(target), processor, [], cache_dir(), dtype) == "streamed"
    else:
        export_built(cfg, Path(checkpoint), Path(target), processor, [], cache_dir(), dtype)
    hwm = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
    print(json.dumps({"hwm_mb": int(hwm.split()[1]) / 1024, "seconds": time.perf_counter() - start}))


def measure(config: str, sets: list[str], checkpoint: str, target: str, how: str, dtype: str) -> dict:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    proc = subprocess.Popen([sys.executable, __file__, "--config", config, "--export", how, "--checkpoint", checkpoint,
                             "--target", target, "--dtype", dtype, *(a for s in sets for a in ("--set", s))],
                            stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": path})
    anon, done = [0.0], threading.Event()

    def sample():
        while not done.is_set():
            try:
                line = next(l for l in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                            if l.startswith("RssAnon:"))
                anon[0] = max(anon[0], int(line.split()[1]) / 1024)
            except (OSError, StopIteration):
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"the {how} export failed ({proc.returncode})")
    return {**json.loads(out.strip().splitlines()[-1]), "anon_mb": anon[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs" / "gpt_ft.yaml"))
    p.add_argument("--set", action="append", default=[], help="more overrides, after the bench's own")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--export", choices=["streamed", "built"], help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help="an existing checkpoint folder (step_...): no training")
    p.add_argument("--target", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help="keep the checkpoint and the exports here (default: a temporary folder)")
    a = p.parse_args()
    sets = SETS + a.set
    if a.export:
        return export_once(a.config, sets, a.checkpoint, a.target, a.export, a.dtype)
    with tempfile.TemporaryDirectory(prefix="sft-export-bench-") as scratch:
        out = a.workdir or scratch
        Path(out).mkdir(parents=True, exist_ok=True)
        checkpoint = a.checkpoint
        if checkpoint is None:
            import torch.multiprocessing as mp

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            start = time.perf_counter()
            mp.spawn(_train, args=(port, a.config, sets, out), nprocs=2, join=True)
            checkpoint = (Path(out) / "checkpoint.txt").read_text()
            print(f"trained the checkpoint in {time.perf_counter() - start:.0f} s: {checkpoint}", flush=True)
        size = sum(f.stat().st_size for f in Path(checkpoint).rglob("*") if f.is_file()) / 2**20
        print(f"{'export':<9} {'dtype':<5} {'peak RSS MB':>12} {'peak anon MB':>13} {'seconds':>8}   (checkpoint {size:,.0f} MB)")
        for how in ("streamed", "built"):
            r = measure(a.config, sets, checkpoint, str(Path(out) / how), how, a.dtype)
            print(f"{how:<9} {a.dtype:<5} {r['hwm_mb']:>12,.0f} {r['anon_mb']:>13,.0f} {r['seconds']:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
