"""The baseline of bench/throughput.py: the same job run by Hugging Face Trainer + DeepSpeed under torchrun.

Same model weights (the de-quantized SmolLM2 the run config names), the same prepared examples
(sft's own preparation, unpacked: Trainer has no packing of its own for this data), the same
micro-batch, accumulation, optimizer, schedule, clipping and DeepSpeed config (sft's, as
`deepspeed.initialize` gets it), the same trainable parameters (finetune.*, LoRA adapters included)
and, with train.gradient_checkpointing, activation checkpointing switched on as sft's worker does.
Prints, on rank 0, a line when training starts and one per step in sft's console format (bench/memory.py
reads them), then one JSON line: the median over the steps (the first left out) of real tokens/s
(Trainer's own `num_input_tokens_seen`, non-padding, summed over ranks). Not a test; bench/throughput.py
and bench/memory.py --hf run it:

    torchrun --nproc_per_node 2 bench/hf_trainer.py CONFIG [--set key=value ...]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[])
    a = p.parse_args()

    import torch
    import torch.distributed as dist
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from launcher.cli import cache_dir
    from trainer import data_cache
    from trainer.config_load import load_config
    from trainer.ds_config import deepspeed_config
    from trainer.lora import trainable_model
    from trainer.model import build_model, load_tokenizer, model_config, prepare_pretrained
    from trainer.tasks import causal_lm

    import deepspeed

    # As trainer/engine.py does: never JIT-compile DeepSpeed's shared-memory op (inference only).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    cfg = load_config(a.config, a.set)
    # The threads sft gives each worker (scaling.cpus_per_worker). OMP_NUM_THREADS too: without it,
    # accelerate (TrainingArguments' device setup) resets torch's threads to physical cores / local
    # ranks, which torchrun leaves alone only with one rank (it sets 1 itself from two): one HF rank
    # then ran on both cores of this machine against sft's one.
    os.environ["OMP_NUM_THREADS"] = str(cfg.scaling.cpus_per_worker)
    torch.set_num_threads(cfg.scaling.cpus_per_worker)
    model_dir = prepare_pretrained(cfg.model, cache_dir())
    tokenizer = load_tokenizer(cfg.model, model_dir)
    train = data_cache.prepare(cfg, tokenizer, None).splits["train"]

    class Examples(torch.utils.data.Dataset):
        def __len__(self):
            return len(train)

        def __getitem__(self, i):
            return train.examples([i])[0]

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, model_dir, [])
    model.config.use_cache = False
    if cfg.train.gradient_checkpointing:  # as trainer/worker.py does, before the adapters
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model, _ = trainable_model(model, cfg.finetune)  # freezing rules, or LoRA adapters (sft's own)
    ds = deepspeed_config(cfg, world, "fp32", hidden_size=model_config(cfg.model, model_dir).hidden_size)
    t = cfg.train
    marks: list[tuple[float, int]] = []

    rank0 = dist.get_rank() == 0

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if rank0:  # the engine is built: what follows is the training phase
                print(f"[hf] training steps 1..{state.max_steps} on {world} worker(s), "
                      f"{torch.get_num_threads()} thread(s) each", flush=True)
            marks[0] = (time.perf_counter(), 0)

        def on_step_end(self, args, state, control, **kwargs):
            marks.append((time.perf_counter(), state.num_input_tokens_seen))
            (t0, n0), (t1, n1) = marks[-2:]
            if rank0:
                print(f"[hf] step {state.global_step}/{state.max_steps}  {(n1 - n0) / (t1 - t0):,.0f} tokens/s  "
                      f"{t1 - t0:.2f} s/step", flush=True)

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=t.micro_batch_size,
            gradient_accumulation_steps=t.gradient_accumulation, max_steps=t.max_steps,
            learning_rate=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, lr_scheduler_type=cfg.optim.scheduler,
            warmup_steps=cfg.optim.warmup_steps, max_grad_norm=cfg.optim.max_grad_norm, logging_steps=10 ** 6,
            save_strategy="no", eval_strategy="no", report_to=[], deepspeed=ds, seed=cfg.seed,
            dataloader_num_workers=0, include_num_input_tokens_seen="non_padding", disable_tqdm=True,
            use_cpu=not torch.cuda.is_available())
        trainer = Trainer(model=model, args=args, train_dataset=Examples(),
                          data_collator=causal_lm.collator(tokenizer), callbacks=[Clock()])
        marks.append((time.perf_counter(), 0))
        trainer.train()
    rates = [(n1 - n0) / (t1 - t0) for (t0, n0), (t1, n1) in zip(marks, marks[1:])]
    if dist.get_rank() == 0:
        print(json.dumps({"tokens_per_s": statistics.median(rates[1:] if len(rates) > 1 else rates),
                          "steps": len(rates)}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
