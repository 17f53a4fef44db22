"""Peak memory of one training step, standard vs chunked causal-LM loss (#26, train.loss_impl).

Each case runs in a fresh subprocess (so ru_maxrss, the process's peak resident memory, belongs to
that case alone): a small Llama built from its config (random weights, fp32, CPU), one micro-batch
of random tokens, every position labelled (the worst case), one forward + backward through the same
objective the causal_lm task trains on (trainer/tasks/causal_lm.py: the model's own loss, or the
hidden-state objective with trainer/chunked_loss.py). It reports the peak before the step (model,
inputs), the peak of the step, their difference, the fp32 logits of the micro-batch, and seconds
(children run with MALLOC_MMAP_THRESHOLD_=1 MiB, so that resident memory follows live tensors).
No DeepSpeed and no Ray: the engine adds the same on both sides. Not a test: run it by hand.

    .venv/bin/python bench/loss_memory.py                                 # 1k and 2k tokens
    .venv/bin/python bench/loss_memory.py --lengths 1024 --vocab 49152 --micro-batch 2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one_case(impl: str, length: int, vocab: int, micro_batch: int, hidden: int, layers: int) -> dict:
    """Runs in the child: build, one step, peaks in MB."""
    import resource
    import time

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.chunked_loss import chunk_count
    from trainer.tasks.causal_lm import hidden_state_objective

    def peak_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=length,
                         tie_word_embeddings=False, use_cache=False)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, vocab, (micro_batch, length))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    before = peak_mb()
    started = time.perf_counter()
    if impl == "standard":
        loss = model(**batch).loss
    else:
        with hidden_state_objective(model, impl, chunk_count(micro_batch, length, vocab)):
            loss = model(**batch).loss
    loss.backward()
    seconds = time.perf_counter() - started
    step = peak_mb()
    return {"impl": impl, "tokens": length, "loss": float(loss), "before_mb": before, "peak_mb": step,
            "step_mb": step - before, "logits_mb": 4 * micro_batch * length * vocab / 2**20, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--case", help=argparse.SUPPRESS)  # the child: one case as JSON
    a = ap.parse_args()
    if a.case:
        sys.path.insert(0, str(REPO))  # this checkout's trainer/, not the installed one
        print(json.dumps(one_case(**json.loads(a.case))))
        return
    rows = []
    for length in a.lengths:
        for impl in ("standard", "chunked"):
            case = {"impl": impl, "length": length, "vocab": a.vocab, "micro_batch": a.micro_batch,
                    "hidden": a.hidden, "layers": a.layers}
            # glibc returns a freed block to the OS only when it was mmapped; its threshold otherwise
            # grows to 32 MB, so freed chunks of logits stay resident in the heap and the peak RSS
            # measures the allocator's history, not what was alive. A fixed 1 MiB threshold makes
            # RSS follow the live tensors (both cases alike; it varied by ~200 MB between runs without).
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
            out = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], cwd=REPO, env=env,
                                 capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"case {case} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"Llama {a.layers} layers, hidden {a.hidden}, vocab {a.vocab:,}, micro-batch {a.micro_batch}, fp32, CPU; "
          f"one forward + backward, every position labelled")
    print("| tokens | loss_impl | loss | peak before MB | step peak MB | step adds MB | logits MB | step / standard "
          "| adds / standard | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = next(b for b in rows if b["tokens"] == r["tokens"] and b["impl"] == "standard")
        print(f"| {r['tokens']} | {r['impl']} | {r['loss']:.5f} | {r['before_mb']:,.0f} | {r['peak_mb']:,.0f} | "
              f"{r['step_mb']:,.0f} | {r['logits_mb']:,.0f} | {r['peak_mb'] / base['peak_mb']:.2f} | "
              f"{r['step_mb'] / base['step_mb']:.2f} | {r['seconds']:.2f} |")


if __name__ == "__main__":
    main()
