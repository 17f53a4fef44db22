"""Data preparation at scale: rows/s cold and cached, and a rank's memory, from 10k to 200k rows.

Generates prompt/response jsonl files (random words; prompt 5-60, response 5-200 words), and for
each size runs, each in a fresh process: the launcher's preparation into an empty cache (cold),
the same again (cached: it must prepare 0 rows), and a rank's use of the prepared data (load it
memory-mapped, deal and collate a whole epoch of micro-batches, read every validation example),
reporting that process's resident memory before and after. Alternating rounds; min / median / max.
Uses the tests' tiny BPE tokenizer and a tiny model config (no weights are loaded). Not a test.

    .venv/bin/python bench/data.py                      # 10k, 50k, 200k rows, 3 rounds
    .venv/bin/python bench/data.py --rows 10000 200000 --rounds 3 --num-proc 2
    .venv/bin/python bench/data.py --rows 100000 --rounds 2 --formats pair alpaca messages sharegpt
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def rss_mb(kind: str = "VmRSS") -> float:
    """This process's resident memory (VmRSS), or its anonymous part (RssAnon: the process's own
    memory) or its file-backed part (RssFile: pages of memory-mapped files, shared by every process
    that maps them and given back by the kernel under pressure)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{kind}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def as_format(fmt: str, prompt: str, response: str) -> dict:
    """One exchange in one of the instruction formats (trainer/conversation.py): the same text each way."""
    if fmt == "pair":
        return {"prompt": prompt, "response": response}
    if fmt == "alpaca":
        instruction, _, query = prompt.partition(" ")
        return {"instruction": instruction, "input": query, "output": response}
    if fmt == "messages":
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}
    return {"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": response}]}


def write_rows(path: Path, n: int, seed: int = 0, fmt: str = "pair") -> None:
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(2000)] + ["the", "a", "of", "and", "to", "is", "in", "what", "how"]
    with path.open("w") as f:
        for _ in range(n):
            prompt = " ".join(rng.choices(words, k=rng.randint(5, 60))) + "?"
            response = " ".join(rng.choices(words, k=rng.randint(5, 200))) + "."
            f.write(json.dumps(as_format(fmt, prompt, response)) + "\n")


def config(data: Path, tokenizer: Path, cache: Path, num_proc: int, packing: bool):
    from tests.helpers import tiny_config, tiny_llama
    from trainer.config_load import from_dict

    return from_dict(tiny_config(cache.parent, tokenizer, model={"architecture": {**tiny_llama(2), "max_position_embeddings": 512},
                                                                   "tokenizer": str(tokenizer)},
                                 data={"train_file": str(data), "max_length": 512, "num_proc": num_proc,
                                       "packing": packing, "cache_dir": str(cache)}))


def child(args: argparse.Namespace) -> dict:
    """One measurement in this (fresh) process."""
    from trainer import data_cache
    from trainer.model import load_tokenizer

    cfg = config(Path(args.data), Path(args.tokenizer), Path(args.cache), args.num_proc, args.packing)
    tokenizer = load_tokenizer(cfg.model, None)
    if args.child == "prepare":
        lines: list[str] = []
        started = time.perf_counter()
        prepared = data_cache.prepare(cfg, tokenizer, Path(args.cache), lines.append)
        seconds = time.perf_counter() - started
        rows = sum(p.rows_read for p in prepared.splits.values())
        return {"seconds": seconds, "cached": any(line.startswith("data: cached") for line in lines),
                "rows": rows, "directory": str(prepared.directory)}
    from trainer.data import MicroBatches
    from trainer.tasks import causal_lm

    before = {k: rss_mb(k) for k in ("VmRSS", "RssAnon", "RssFile")}
    data = data_cache.load(Path(args.directory))
    collate = causal_lm.collator(tokenizer)
    batches = MicroBatches(data.splits["train"], 0, 2, 8, seed=1)
    tokens = 0
    while batches.epoch == 0:  # this rank's half of an epoch
        tokens += int(collate(next(batches))["input_ids"].numel())
    validation = data.splits["validation"]
    for start in range(0, len(validation), 64):
        collate(validation.examples(range(start, min(start + 64, len(validation)))))
    after = {k: rss_mb(k) for k in before}
    return {"rss_before_mb": before["VmRSS"], "rss_after_mb": after["VmRSS"], "tokens": tokens,
            "anon_growth_mb": after["RssAnon"] - before["RssAnon"], "file_growth_mb": after["RssFile"] - before["RssFile"]}


def run_child(mode: str, packing: bool, **kw) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, *(["--packing"] if packing else [])]
    cmd += [a for k, v in kw.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def spread(values: list[float], fmt: str = "{:,.1f}") -> str:
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", type=int, default=[10_000, 50_000, 200_000])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num-proc", type=int, default=1)
    p.add_argument("--packing", action="store_true")
    p.add_argument("--formats", nargs="+", choices=["pair", "alpaca", "messages", "sharegpt"],
                   help="instead of the sizes: cold preparation rows/s of each format at --rows[0] rows, "
                        "the same text in each, as ratios to the first format")
    p.add_argument("--child", choices=["prepare", "rank"])
    p.add_argument("--data"), p.add_argument("--tokenizer"), p.add_argument("--cache"), p.add_argument("--directory")
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a)))
        return
    from tests.helpers import make_tokenizer

    with tempfile.TemporaryDirectory(prefix="sft-bench-data-") as tmp:
        tmp = Path(tmp)
        tokenizer = make_tokenizer(tmp / "tokenizer")
        if a.formats:
            return formats(a, tmp, tokenizer)
        files = {}
        for n in a.rows:
            files[n] = tmp / f"rows-{n}.jsonl"
            write_rows(files[n], n)
        results: dict[int, dict[str, list]] = {n: {"cold": [], "cached": [], "growth": [], "rss": [], "anon": [],
                                                   "file": []} for n in a.rows}
        for r in range(a.rounds):
            for n in a.rows:  # alternating sizes within each round
                cache = tmp / f"cache-{n}-{r}"
                kw = dict(packing=a.packing, data=files[n], tokenizer=tokenizer, cache=cache, num_proc=a.num_proc)
                cold = run_child("prepare", **kw)
                cached = run_child("prepare", **kw)
                assert cached["cached"] and not cold["cached"], (cold, cached)
                rank = run_child("rank", **kw, directory=cold["directory"])
                results[n]["cold"].append(cold["rows"] / cold["seconds"])
                results[n]["cached"].append(cached["seconds"])
                results[n]["growth"].append(rank["rss_after_mb"] - rank["rss_before_mb"])
                results[n]["rss"].append(rank["rss_after_mb"])
                results[n]["anon"].append(rank["anon_growth_mb"])
                results[n]["file"].append(rank["file_growth_mb"])
                print(f"round {r + 1}: {n:,} rows: cold {cold['seconds']:.1f} s, cached {cached['seconds']:.2f} s "
                      f"(0 rows prepared), rank RSS {rank['rss_before_mb']:,.0f} -> {rank['rss_after_mb']:,.0f} MB "
                      f"(anonymous {rank['anon_growth_mb']:+,.0f}, memory-mapped file {rank['file_growth_mb']:+,.0f})",
                      flush=True)
        print(f"\nnum_proc {a.num_proc}, packing {a.packing}; min / median / max over {a.rounds} rounds")
        print("| rows | cold rows/s | cached launch s | rank RSS growth MB (load + an epoch + validation) | of it anonymous "
              "MB | of it memory-mapped file MB | rank RSS MB |")
        print("|---|---|---|---|---|---|---|")
        for n in a.rows:
            x = results[n]
            print(f"| {n:,} | {spread(x['cold'], '{:,.0f}')} | {spread(x['cached'], '{:.2f}')} | "
                  f"{spread(x['growth'], '{:,.0f}')} | {spread(x['anon'], '{:,.0f}')} | {spread(x['file'], '{:,.0f}')} | "
                  f"{spread(x['rss'], '{:,.0f}')} |")
        lo, hi = min(a.rows), max(a.rows)
        for what, key in (("resident memory", "rss"), ("anonymous memory", "anon")):
            delta = statistics.median(results[hi][key]) - statistics.median(results[lo][key])
            print(f"rank {what}, {hi:,} rows minus {lo:,} rows (medians): {delta:+,.0f} MB (target <= 300 MB)")


def formats(a: argparse.Namespace, tmp: Path, tokenizer: Path) -> None:
    """Cold preparation of the same rows in each format (the tests' ChatML template renders them all)."""
    n = a.rows[0]
    files = {fmt: tmp / f"{fmt}-{n}.jsonl" for fmt in a.formats}
    for fmt, path in files.items():
        write_rows(path, n, fmt=fmt)
    speed: dict[str, list[float]] = {fmt: [] for fmt in a.formats}
    for r in range(a.rounds):
        for fmt in a.formats:  # alternating formats within each round
            cold = run_child("prepare", a.packing, data=files[fmt], tokenizer=tokenizer, cache=tmp / f"cache-{fmt}-{r}",
                             num_proc=a.num_proc)
            speed[fmt].append(cold["rows"] / cold["seconds"])
            print(f"round {r + 1}: {fmt}: {n:,} rows in {cold['seconds']:.1f} s", flush=True)
    base = statistics.median(speed[a.formats[0]])
    print(f"\n{n:,} rows, num_proc {a.num_proc}; cold preparation, min / median / max over {a.rounds} rounds")
    print(f"| format | rows/s | median vs {a.formats[0]} |\n|---|---|---|")
    for fmt in a.formats:
        print(f"| {fmt} | {spread(speed[fmt], '{:,.0f}')} | {statistics.median(speed[fmt]) / base:.2f}x |")


if __name__ == "__main__":
    main()
