"""Real tokens/s of sft-launch with packing off and on, and of HF Trainer on the same job, on a Dolly-like mix.

Generates prompt/response rows whose rendered length (SmolLM2's chat template) spreads over
20-400 tokens the way instruction sets do (log-normal, median ~110 tokens, clipped), and runs the
shipped SmolLM2-135M config on them with data.max_length 512: packing off / on, alternating, for
`--rounds` rounds, and the same job (model, prepared examples, batch, optimizer, schedule and
DeepSpeed config) run by Hugging Face Trainer under torchrun (bench/hf_trainer.py), unpacked, once as
torchrun starts it and once with the C allocator setting sft gives its workers (WORKER_ENV). Each
launch trains `--steps` steps; the figure is the median over its steps (the first left out) of
real tokens/s (sft: TensorBoard's train/tokens_per_s; Trainer: its non-padding
num_input_tokens_seen). Prints min / median / max per setting and the ratios. Not a test.

    .venv/bin/python bench/throughput.py                  # 3 rounds, 8 steps, micro-batch 8, 2 workers
    .venv/bin/python bench/throughput.py --rounds 3 --steps 6 --workers 1
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from launcher.ray_job import WORKER_ENV  # noqa: E402  (the allocator setting sft gives its workers)

SAME_ALLOCATOR = "HF Trainer + DeepSpeed (torchrun), sft's allocator setting"

WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by "
         "word but not what all were we when your can said there use an each which she do how their if will up "
         "other about out many then them these so some her would make like him into time has look two more write "
         "go see number no way could people my than first water been call who oil its now find long down day did "
         "get come made may part").split()


def dolly_like_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows whose prompt + response is about 20-400 words (~tokens), log-normal around 110."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        total = int(min(400, max(20, rng.lognormvariate(math.log(110), 0.7))))
        prompt_len = max(3, int(total * rng.uniform(0.1, 0.5)))
        rows.append({"prompt": " ".join(rng.choices(WORDS, k=prompt_len)) + "?",
                     "response": " ".join(rng.choices(WORDS, k=max(2, total - prompt_len - 12))) + "."})
    return rows


def tokens_per_s(tensorboard: Path) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tensorboard), size_guidance={"scalars": 0})
    acc.Reload()
    values = [e.value for e in sorted(acc.Scalars("train/tokens_per_s"), key=lambda e: e.step)]
    return statistics.median(values[1:] if len(values) > 1 else values)


def overrides(data: Path, packing: bool, steps: int, workers: int, micro_batch: int, cache: Path) -> list[str]:
    sets = {"data.train_file": json.dumps(str(data)), "data.max_length": "512", "data.packing": str(packing).lower(),
            "data.cache_dir": json.dumps(str(cache)), "train.max_steps": str(steps), "train.eval_every": str(steps),
            "train.log_every": "1", "train.micro_batch_size": str(micro_batch), "scaling.workers_per_node": str(workers),
            # a small validation and test split: the launch's evaluations are not what is measured
            "data.fractions": "[0.98, 0.01, 0.01]"}
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def launch(args: list[str]) -> float:
    with tempfile.TemporaryDirectory(prefix="sft-bench-tp-") as out:
        proc = subprocess.run([sys.executable, "-m", "launcher.cli", str(REPO / "configs" / "gpt_ft.yaml"),
                               "--output", out, *args], capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            raise SystemExit(f"sft-launch failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return tokens_per_s(Path(out) / "tensorboard")


def hf_trainer(args: list[str], workers: int, port: int, env: dict | None = None) -> float:
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(workers),
                           "--master_port", str(port), str(REPO / "bench" / "hf_trainer.py"),
                           str(REPO / "configs" / "gpt_ft.yaml"), *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise SystemExit(f"HF Trainer failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["tokens_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=8)
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="sft-bench-tp-data-") as tmp:
        data = Path(tmp) / "dolly_like.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in dolly_like_rows(a.rows)))
        results: dict[str, list[float]] = {"sft-launch, packing off": [], "sft-launch, packing on": [],
                                           "HF Trainer + DeepSpeed (torchrun)": [], SAME_ALLOCATOR: []}
        for r in range(a.rounds):
            for name in results:  # alternating
                packing = name.endswith("packing on")
                args = overrides(data, packing, a.steps, a.workers, a.micro_batch, Path(tmp) / "cache")
                if name.startswith("sft"):
                    value = launch(args)
                else:  # the second: with the C allocator setting sft gives its workers (launcher.ray_job)
                    value = hf_trainer(args, a.workers, 29650 + r, WORKER_ENV if name == SAME_ALLOCATOR else None)
                results[name].append(value)
                print(f"round {r + 1}: {name}: {value:,.0f} tokens/s", flush=True)
    print(f"\nSmolLM2-135M ({'config: last 2 blocks train'}), {a.workers} worker(s), micro-batch {a.micro_batch}, "
          f"max_length 512, {a.steps} steps; real tokens/s, min / median / max over {a.rounds} rounds")
    print("| run | tokens/s |\n|---|---|")
    for name, values in results.items():
        print(f"| {name} | {' / '.join(f'{v:,.0f}' for v in (min(values), statistics.median(values), max(values)))} |")
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"\npacked / unpacked (medians): {med['sft-launch, packing on'] / med['sft-launch, packing off']:.2f}x "
          f"(target >= 1.8x)")
    print(f"sft-launch unpacked / HF Trainer (medians): "
          f"{med['sft-launch, packing off'] / med['HF Trainer + DeepSpeed (torchrun)']:.2f}x (target >= 1.0x); "
          f"with the same allocator setting: {med['sft-launch, packing off'] / med[SAME_ALLOCATOR]:.2f}x")


if __name__ == "__main__":
    main()
