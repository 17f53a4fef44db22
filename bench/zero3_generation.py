"""The test phase's time under ZeRO-0 and ZeRO-3 (gathered and synced generation), side by side.

Launches the shipped config (SmolLM2-135M, every test prompt answered before and after
fine-tuning, greedy) once per variant as a user does (`sft-launch` with `--set`), times the test
phase from the console line that opens it ("test evaluation on the ...") to the export's line, and
compares the generated test answers with ZeRO-0's: "before" (the same pretrained weights: must be
identical) and "after" (weights trained under another ZeRO stage: float sums in another order, so
a few answers may differ). Reports each variant's time as a ratio to ZeRO-0's in the same run.
Training is cut to a few steps: it is not what is measured. Not a test: run it by hand.

    .venv/bin/python bench/zero3_generation.py                      # 0, 3 (gathered); ~6 minutes here
    .venv/bin/python bench/zero3_generation.py --variants 0 3 3-synced --steps 3
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"0": (0, "auto"), "3": (3, "gathered"), "3-auto": (3, "auto"), "3-synced": (3, "synced")}


def launch(config: Path, stage: int, zero3: str, steps: int, workers: int) -> dict:
    """One launch: the test phase's seconds and the test answers (before, after) by id."""
    sets = [f"deepspeed.zero_stage={stage}", f"eval.generate.zero3={zero3}", f"train.max_steps={steps}",
            f"train.eval_every={steps}", f"train.save_every={steps}", f"scaling.workers_per_node={workers}"]
    with tempfile.TemporaryDirectory(prefix="sft-bench-") as out:
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", str(config), "--output", out,
                                 *[a for s in sets for a in ("--set", s)]],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path})
        lines, opened, exported, parts = [], None, None, []
        for line in proc.stdout:
            lines.append(line)
            if "[sft] test evaluation on the" in line:
                opened = time.perf_counter()
            elif "[sft] exported the consolidated model" in line:
                exported = time.perf_counter()
            if opened and ("[sft] test phase: " in line or "[sft] exported" in line):
                parts.append(line.split("[sft] ", 1)[1].strip())  # each closes with its seconds
        if proc.wait() != 0 or opened is None or exported is None:
            raise SystemExit(f"sft-launch failed ({proc.returncode}):\n{''.join(lines[-30:])}")
        rows = [json.loads(r) for r in (Path(out) / "test_generations.jsonl").read_text().splitlines()]
        said = [l.split("[sft] ", 1)[1].strip() for l in lines if "generation under ZeRO-3:" in l]
    return {"seconds": exported - opened, "before": {r["id"]: r["before"] for r in rows},
            "after": {r["id"]: r["after"] for r in rows}, "said": said[:1], "parts": parts}


def same(a: dict, b: dict) -> str:
    return f"{sum(a[k] == b[k] for k in a)}/{len(a)}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs" / "gpt_ft.yaml"))
    p.add_argument("--variants", nargs="+", default=["0", "3"], choices=sorted(VARIANTS))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args()
    results = {}
    for name in a.variants:
        stage, zero3 = VARIANTS[name]
        results[name] = launch(Path(a.config), stage, zero3, a.steps, a.workers)
        print(f"{name}: test phase {results[name]['seconds']:.1f} s {results[name]['said']}", flush=True)
        for part in results[name]["parts"]:
            print(f"    {part}", flush=True)
    base = results[a.variants[0]]
    print(f"\n| variant | test phase (s) | × {a.variants[0]} | same answers before | same answers after |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['seconds']:.1f} | {r['seconds'] / base['seconds']:.2f} | {same(r['before'], base['before'])} "
              f"| {same(r['after'], base['after'])} |")


if __name__ == "__main__":
    main()
