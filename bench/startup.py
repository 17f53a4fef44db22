"""Seconds from the command to the first optimizer step: sft-launch vs the same loop under torchrun.

Both run the tests' tiny GPT-2 config (2 workers, ZeRO-2, gloo, fp32) for 2 steps. sft-launch is
timed from its start to the console's "step 1/" line, and split at its own lines: preflight (until
"training: ..."), then Ray and the worker group up to the workers' first line, then the workers'
setup and the first step. torchrun runs the very same worker loop (trainer.loop.run) in a process
group torchrun makes, with no Ray and no preflight. "Ray Train alone" is the floor of any Ray Train
launcher here: the launcher's own Ray start and a TorchTrainer of 2 workers that return at once, timed
from the command to the first worker running. Alternating rounds; min / median / max. Not a test.

    .venv/bin/python bench/startup.py --rounds 3
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def timed_lines(cmd: list[str], marks: dict[str, str]) -> dict[str, float]:
    """Run `cmd`; seconds from start to the first line containing each mark's text."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen, lines = {}, []
    for line in proc.stdout:
        lines.append(line)
        for name, text in marks.items():
            if name not in seen and text in line:
                seen[name] = time.perf_counter() - started
    if proc.wait() != 0 or len(seen) < len(marks):
        raise SystemExit(f"{cmd[:4]} failed or missed a mark ({sorted(set(marks) - set(seen))}):\n{''.join(lines[-40:])}")
    return seen


def worker(config: str) -> None:
    """torchrun's side: the process group is torchrun's; the loop is sft's."""
    import torch.distributed as dist

    from trainer.config_load import load_config
    from trainer.loop import WorkerArgs, run

    class Print:
        def report(self, message, checkpoint=None):
            pass

        def log(self, text, after_training=False):
            if dist.get_rank() == 0:
                print(text, flush=True)

    dist.init_process_group("gloo")
    with tempfile.TemporaryDirectory() as tmp:
        run(load_config(config), Print(), WorkerArgs(cache_dir=tmp))
    dist.destroy_process_group()


def ray_floor(workers: int) -> None:
    """Ray Train alone: the launcher's own Ray start, then a TorchTrainer whose workers return at once;
    prints the wall-clock time at which the first worker ran."""
    from launcher import ray_job

    ray_job.start_ray(None)  # first: Ray reads its environment (the run's auth token) at import
    import ray.train
    from ray.train.torch import TorchTrainer

    def first(config):
        with open(config["path"], "a") as f:
            f.write(f"{time.time()}\n")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "first"
        TorchTrainer(first, train_loop_config={"path": str(path)},
                     scaling_config=ray.train.ScalingConfig(num_workers=workers),
                     run_config=ray.train.RunConfig(storage_path=tmp)).fit()
        print(f"first worker at {min(float(t) for t in path.read_text().split())}", flush=True)
    ray_job.stop_ray()


def timed_floor(workers: int) -> float:
    started = time.time()
    proc = subprocess.run([sys.executable, __file__, "--ray-floor", str(workers)], capture_output=True, text=True,
                          cwd=REPO)
    line = [l for l in proc.stdout.splitlines() if l.startswith("first worker at ")]
    if proc.returncode != 0 or not line:
        raise SystemExit(f"the Ray Train floor failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return float(line[0].split()[-1]) - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--worker")
    p.add_argument("--ray-floor", type=int)
    a = p.parse_args()
    if a.worker:
        worker(a.worker)
        return
    if a.ray_floor:
        ray_floor(a.ray_floor)
        return
    from tests.helpers import make_tokenizer, tiny_config, write_config

    with tempfile.TemporaryDirectory(prefix="sft-bench-start-") as tmp:
        tmp = Path(tmp)
        tokenizer = make_tokenizer(tmp / "tokenizer")
        results: dict[str, list[float]] = {k: [] for k in ("preflight", "ray+group", "setup+step", "sft-launch",
                                                           "torchrun", "Ray Train alone")}
        for r in range(a.rounds):
            raw = tiny_config(tmp / f"r{r}", tokenizer, train={"max_steps": 2, "log_every": 1, "eval_every": 2})
            config = write_config(tmp / f"r{r}.yaml", raw)
            sft = timed_lines([sys.executable, "-m", "launcher.cli", str(config)],
                              {"trained": "[sft] training:", "workers": "data: cached", "step": "step 1/"})
            tr = timed_lines([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                              "--master_port", str(29600 + r), __file__, "--worker", str(config)], {"step": "step 1/"})
            floor = timed_floor(2)
            results["Ray Train alone"].append(floor)
            results["preflight"].append(sft["trained"])
            results["ray+group"].append(sft["workers"] - sft["trained"])
            results["setup+step"].append(sft["step"] - sft["workers"])
            results["sft-launch"].append(sft["step"])
            results["torchrun"].append(tr["step"])
            print(f"round {r + 1}: sft-launch {sft['step']:.1f} s (preflight {sft['trained']:.1f}, Ray + worker group "
                  f"{sft['workers'] - sft['trained']:.1f}, setup + step 1 {sft['step'] - sft['workers']:.1f}); "
                  f"torchrun {tr['step']:.1f} s; Ray Train alone {floor:.1f} s", flush=True)
    print(f"\nseconds to the first optimizer step, tiny GPT-2, 2 workers; min / median / max over {a.rounds} rounds")
    print("| phase | seconds |\n|---|---|")
    for name, values in results.items():
        print(f"| {name} | {' / '.join(f'{v:.1f}' for v in (min(values), statistics.median(values), max(values)))} |")
    ratio = statistics.median(results["sft-launch"]) / statistics.median(results["torchrun"])
    print(f"\nsft-launch / torchrun (medians): {ratio:.2f}x (target <= 2x); Ray Train alone / torchrun: "
          f"{statistics.median(results['Ray Train alone']) / statistics.median(results['torchrun']):.2f}x")


if __name__ == "__main__":
    main()
