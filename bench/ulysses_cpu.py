"""Does DeepSpeed's Ulysses sequence parallelism run on CPU/gloo, and does SP=2 equal SP=1? (#26 point 3)

Two spawned CPU ranks (gloo, fp32, no Ray), one SP group of 2 (data-parallel size 1). A small Llama is
built from its config (2 layers, hidden 64, 4 heads, 2 KV heads, sdpa) with the same seed on both
ranks. Before Ulysses is registered, each rank computes the reference (SP=1): the whole sequence,
transformers' own causal-LM loss, a plain backward. Then
`UlyssesSPAttentionHF.register_with_transformers` (DeepSpeed's mpu, sdpa wrapped) and
`UlyssesSPDataLoaderAdapter` (each rank's loader yields its own micro-batch; the adapter gathers them
and hands each rank one half of each, with `shift_labels` pre-shifted) give the SP=2 pass: each rank's
loss is its half's summed cross-entropy over the whole sequence's valid-token count, so the SP group's
sum is the sequence's mean. Labels are partly -100 so the halves hold unequal token counts (12 and 7).

Cases: `plain` (no engine: gradients all-reduced over the SP group by hand), `zero0`..`zero3`
(`deepspeed.initialize(..., mpu=mpu)`; gradients read with `safe_get_full_grad` after
`engine.backward`, the grad norm after `engine.step`), and `zero3-unscaled`. `zero3` multiplies the
loss by the SP size: DeepSpeed 0.19's ZeRO-3 averages gradients over the SP group where stages 0-2
sum them (`zero3-unscaled` shows the 0.5x; transformers' `deepspeed_sp_compute_loss` applies the same
correction before DeepSpeed 0.20.2). A case passes when loss and every gradient are within 1e-5.
Not a test: run it by hand (two processes; 12-40 s a case on the shared 2 cores here).

    flock /tmp/sft-heavy.lock .venv/bin/python bench/ulysses_cpu.py                  # all cases
    flock /tmp/sft-heavy.lock .venv/bin/python bench/ulysses_cpu.py --cases plain zero3
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from datetime import timedelta

SP, MICRO_BATCH, LENGTH, VOCAB = 2, 2, 16, 96
CASES = ("plain", "zero0", "zero1", "zero2", "zero3", "zero3-unscaled")
TOLERANCE = 1e-5


def micro_batches() -> list[dict]:
    """One micro-batch per rank's own loader; row 0 has a masked 'prompt', row 1 a masked second half."""
    import torch

    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(SP):
        ids = torch.randint(0, VOCAB, (MICRO_BATCH, LENGTH), generator=g)
        labels = ids.clone()
        labels[0, :5] = -100
        labels[1, 9:] = -100
        out.append({"input_ids": ids, "labels": labels,
                    "position_ids": torch.arange(LENGTH).expand(MICRO_BATCH, LENGTH).clone()})
    return out


def build_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).float()


def reference(model, batch: dict) -> tuple[float, dict]:
    """SP=1: the whole sequence through the plain model (Ulysses not registered yet)."""
    model.zero_grad()
    out = model(input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"])
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return out.loss.item(), grads


def rank_main(rank: int, port: int, case: str, results) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(SP), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    import warnings

    import torch
    import torch.distributed as tdist

    # DeepSpeed 0.19 calls all_gather_into_tensor / reduce_scatter_tensor, which torch 2.13 deprecates
    warnings.filterwarnings("ignore", message=".*is deprecated.*", category=FutureWarning)
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=SP,
                             timeout=timedelta(seconds=120))
    import deepspeed
    import deepspeed.comm as dist
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF, UlyssesSPDataLoaderAdapter
    from deepspeed.utils import safe_get_full_grad

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # as trainer/engine.py: never JIT-built
    deepspeed.init_distributed()

    data = micro_batches()
    model = build_model()
    refs = [reference(model, b) for b in data]
    # Replaces transformers' "sdpa" attention function in this process with the Ulysses wrapper.
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model, core_attn_implementation="sdpa", sequence_parallel_size=SP,
        micro_batch_size=MICRO_BATCH, seq_length_is_variable=True)
    group = mpu.get_sequence_parallel_group()
    loader = UlyssesSPDataLoaderAdapter([data[rank]], sp_rank=mpu.get_sequence_parallel_rank(), sp_group=group,
                                        sp_world_size=SP, device=torch.device("cpu"))
    engine = None
    if case != "plain":
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), mpu=mpu, config={
            "train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": 1,
            "train_batch_size": MICRO_BATCH,  # data-parallel size = world / SP = 1
            "zero_optimization": {"stage": int(case[4])}, "steps_per_print": 10 ** 9,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}})
    rows = []
    for i, mb in enumerate(loader):
        # ulysses_sp.py:724 cuts each shard as batch[k][:, a:b].cpu(); on CPU .cpu() copies nothing, so
        # with a micro-batch > 1 the shard is a non-contiguous view and transformers' loss
        # (loss_utils.py:71, shift_labels.view(-1)) raises. On a GPU that .cpu() is a copy.
        mb = {k: v.contiguous() if torch.is_tensor(v) else v for k, v in mb.items()}
        tokens = (mb["shift_labels"] != -100).sum()
        total = tokens.clone()
        dist.all_reduce(total, group=group)
        # labels=shift_labels so that the model computes a loss; transformers uses shift_labels unshifted
        out = (engine or model)(input_ids=mb["input_ids"], position_ids=mb["position_ids"],
                                labels=mb["shift_labels"], shift_labels=mb["shift_labels"], num_items_in_batch=total)
        loss = out.loss  # this half's summed CE / the whole sequence's tokens
        shown = loss.detach().clone()
        dist.all_reduce(shown, group=group)
        norm = float("nan")  # no engine, or ZeRO-0 (DeepSpeed computes no norm there)
        if engine is None:
            loss.backward()
            grads = {}
            for n, p in model.named_parameters():
                g = p.grad.detach().clone()
                dist.all_reduce(g, group=group)  # the halves of one sequence: their gradients add up
                grads[n] = g
            model.zero_grad()
        else:
            engine.backward(loss * SP if case == "zero3" else loss)
            grads = {n: safe_get_full_grad(p).detach().clone() for n, p in engine.module.named_parameters()}
            engine.step()
            norm = engine.get_global_grad_norm()
            norm = float(norm) if norm is not None else float("nan")
        ref_loss, ref_grads = refs[i]
        ratio = float(sum((grads[n] * ref_grads[n]).sum() for n in ref_grads)
                      / sum((ref_grads[n] ** 2).sum() for n in ref_grads))
        ref_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in ref_grads.values()])))
        rows.append({"case": case, "micro-batch": i, "rank-0 tokens": f"{int(tokens)}/{int(total)}",
                     "loss SP=1": ref_loss, "loss SP=2": shown.item(), "|d loss|": abs(ref_loss - shown.item()),
                     "max |d grad|": max(float((grads[n] - ref_grads[n]).abs().max()) for n in ref_grads),
                     "grad / ref": ratio, "norm SP=1": ref_norm, "engine norm": norm})
        if engine is not None:
            break  # the step changed the weights: the second micro-batch has no reference any more
    if rank == 0:
        results.put(rows)
    dist.barrier()
    tdist.destroy_process_group()


def run_case(case: str) -> list[dict]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(rank_main, args=(port, case, results), nprocs=SP, join=True, start_method="spawn")
    return results.get()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    args = parser.parse_args()
    import deepspeed
    import torch
    import transformers

    print(f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}; "
          f"SP={SP} on 2 CPU ranks (gloo), micro-batch {MICRO_BATCH} x {LENGTH} tokens, fp32", flush=True)
    columns = ["case", "micro-batch", "rank-0 tokens", "loss SP=1", "loss SP=2", "|d loss|", "max |d grad|", "grad / ref",
               "norm SP=1", "engine norm"]
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns), flush=True)
    failed = []
    for case in args.cases:
        try:
            rows = run_case(case)
        except Exception as err:  # a case that does not run is a finding too
            print(f"| {case} | failed: {str(err).strip().splitlines()[-1]} |", flush=True)
            failed.append(case)
            continue
        for row in rows:
            print("| " + " | ".join(f"{row[c]:.8f}" if c.startswith(("loss", "norm", "engine")) else
                                    f"{row[c]:.2e}" if c.startswith("|d") or c.startswith("max") else
                                    f"{row[c]:.4f}" if c == "grad / ref" else str(row[c]) for c in columns) + " |",
                  flush=True)
            equal = row["|d loss|"] <= TOLERANCE and row["max |d grad|"] <= TOLERANCE
            if equal == (case == "zero3-unscaled"):  # the unscaled case is expected to differ
                failed.append(case)
    print(f"\n{'all cases as expected' if not failed else 'unexpected: ' + ', '.join(sorted(set(failed)))} "
          f"(tolerance {TOLERANCE:g}; zero3-unscaled is expected to differ)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
