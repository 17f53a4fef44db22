"""The per-worker fine-tuning loop. Every rank runs exactly these functions.

`run` trains (with validation and checkpoints); `run_test` evaluates the test split before
fine-tuning and from the final sharded checkpoint on disk, then rank 0 exports the consolidated
model. The process group exists already (the orchestrator made it). Talks to the orchestrator only
through `reporter`; never imports ray.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Optional

from launcher.config import ConfigError, RunConfig
from trainer import checkpoints
from trainer.checkpoints import TrainState
from trainer.data import MicroBatches, load_splits, tokenize_split
from trainer.ds_config import deepspeed_config, resolve_precision
from trainer.evaluation import evaluate, evaluate_classification
from trainer.freezing import apply_trainable, describe_layout, select_trainable
from trainer.model import build_model, load_processor, prepare_pretrained
from trainer.report import Reporter
from trainer.splits import total_steps
from trainer.tasks import CLASSIFICATION, Prepared, collator, label_names, prepare


@dataclass(frozen=True)
class WorkerArgs:
    """What a worker needs beyond the config: where things are, and where to start from."""
    cache_dir: str
    tensorboard_dir: Optional[str] = None
    resume_from: Optional[str] = None  # a checkpoint folder chosen by --resume
    restart_from: Optional[str] = None  # the orchestrator's latest checkpoint after a worker restart
    export_dir: Optional[str] = None  # run_test: where rank 0 writes the consolidated model
    predictions_path: Optional[str] = None  # run_test: where rank 0 writes the test predictions
    stop_file: Optional[str] = None  # when it exists, every rank checkpoints after this step and stops
    universal: bool = False  # resume_from is read in DeepSpeed's universal format (world size changed)
    final_checkpoint: Optional[str] = None  # run_test: the checkpoint to evaluate
    threads: int = 1


@dataclass
class Setup:
    engine: object
    processor: object  # tokenizer, or image processor
    collate: object
    data: dict  # split name -> Prepared
    labels: list  # label names of classification tasks
    total_steps: int
    device: object
    rank: int
    world: int
    model_id: str
    trainable_digest: str
    universal: bool  # the resume checkpoint is read in DeepSpeed's universal format


def _log(rank: int, text: str) -> None:
    if rank == 0:
        print(f"[sft] {text}", flush=True)


def setup(cfg: RunConfig, args: WorkerArgs, splits: tuple[str, ...]) -> Setup:
    """Model, freezing, data and DeepSpeed engine, identical on every rank."""
    import deepspeed
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    if not on_gpu:
        torch.set_num_threads(args.threads)
    precision = resolve_precision(cfg.deepspeed.precision, on_gpu, on_gpu and torch.cuda.is_bf16_supported())

    task = cfg.model.task
    model_dir = prepare_pretrained(cfg.model, args.cache_dir)
    processor = load_processor(cfg.model, model_dir)
    raw = dict(zip(("train", "validation", "test"), load_splits(cfg)))
    labels = label_names(cfg, raw["train"]) if task in CLASSIFICATION else []
    torch.manual_seed(cfg.seed)  # same seed on all ranks: identical initial weights and heads
    model = build_model(cfg.model, model_dir, labels)
    names = [n for n, _ in model.named_parameters()]
    trainable = select_trainable(names, cfg.finetune, describe_layout(model))
    apply_trainable(model, trainable)
    torch.manual_seed(cfg.seed + 1000 * (rank + 1))  # dropout differs across ranks, reproducibly

    data = {}
    for name in splits:
        if task == "causal_lm":
            examples, dropped = tokenize_split(raw[name], cfg.data, processor)
            data[name] = Prepared(examples)
            if dropped:
                _log(rank, f"{name}: dropped {dropped} of {len(raw[name].records)} rows (a response beyond "
                           f"data.max_length = {cfg.data.max_length}, or a bad row with data.skip_bad_rows)")
        else:
            data[name] = prepare(cfg, raw[name], processor, labels)
            if data[name].skipped:
                _log(rank, f"{name}: skipped {data[name].skipped} bad rows of {len(raw[name].records)} "
                           f"(data.skip_bad_rows)")
    n_train = len(data["train"].examples) if "train" in data else len(raw["train"].records)
    steps = total_steps(n_train, world, cfg.train.micro_batch_size, cfg.train.gradient_accumulation,
                        cfg.train.epochs, cfg.train.max_steps)

    # Freeze first: ZeRO partitions and the optimizer hold only what they are given.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [g for g in ({"params": decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    warmup = cfg.optim.warmup_steps or math.ceil(cfg.optim.warmup_ratio * steps)

    def scheduler(optimizer):
        from transformers import get_scheduler
        return get_scheduler(cfg.optim.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=steps)

    # The shared-memory all-reduce op is JIT-compiled on first use and serves only inference; skip it.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    universal = args.universal and args.restart_from is None and args.resume_from is not None
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, lr_scheduler=scheduler,
                                      config=deepspeed_config(cfg, world, precision, load_universal=universal))
    return Setup(engine, processor, collator(task, processor), data, labels, steps, device, rank, world,
                 checkpoints.model_identity(cfg.model), checkpoints.trainable_digest(trainable), universal)


def evaluate_split(cfg: RunConfig, s: Setup, split: str) -> tuple[dict, list]:
    """Metrics of the engine's current weights on a split (each example counted once across ranks),
    and, for classification tasks, the per-example predictions."""
    def forward(batch):
        return s.engine(**{k: v for k, v in batch.items() if k != "labels"}).logits

    s.engine.eval()
    try:
        if cfg.model.task == "causal_lm":
            return evaluate(forward, s.data[split].examples, s.collate, s.rank, s.world,
                            cfg.train.micro_batch_size, s.device), []
        return evaluate_classification(cfg.model.task, forward, s.data[split], s.collate, s.rank, s.world,
                                       cfg.train.micro_batch_size, s.device, s.labels)
    finally:
        s.engine.train()


def scalars(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k not in ("tokens", "examples")}


def _mean_across_ranks(values: list[float], device) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def run(cfg: RunConfig, reporter: Reporter, args: WorkerArgs) -> TrainState:
    """Fine-tune: train, validate every eval_every steps, checkpoint every save_every, report both."""
    import torch.distributed as dist

    s = setup(cfg, args, ("train", "validation"))
    engine, rank = s.engine, s.rank
    state = TrainState(step=0, micro_step=0, world_size=s.world, zero_stage=cfg.deepspeed.zero_stage,
                       model=s.model_id, trainable=s.trainable_digest)
    start_from = args.restart_from or args.resume_from
    if start_from:
        saved = checkpoints.read_state(Path(start_from))
        if saved.model != s.model_id:
            raise ConfigError(f"--resume: {start_from} holds a checkpoint of {saved.model!r}, "
                              f"not of {s.model_id!r}")
        state = checkpoints.load(engine, Path(start_from), rank, universal=s.universal)
        state.trainable, state.world_size = s.trainable_digest, s.world
        _log(rank, f"resumed from {start_from} at step {state.step}")

    writer = None
    if rank == 0 and args.tensorboard_dir:
        from torch.utils.tensorboard import SummaryWriter
        # purge_step hides points a previous attempt logged past this checkpoint: no duplicates.
        writer = SummaryWriter(args.tensorboard_dir, purge_step=state.step + 1)

    accumulation = cfg.train.gradient_accumulation
    train, validation = s.data["train"].examples, s.data["validation"].examples
    batches = MicroBatches(train, s.collate, rank, s.world, cfg.train.micro_batch_size, cfg.seed,
                           epoch=state.epoch, position=state.position)
    unit = "samples" if cfg.model.task == "image_classification" else "tokens"
    _log(rank, f"training steps {state.step + 1}..{s.total_steps} on {s.world} worker(s), "
               f"{len(train)} training examples, {len(validation)} validation examples")
    engine.train()
    for step in range(state.step + 1, s.total_steps + 1):
        started, loss_sum, tokens = time.perf_counter(), 0.0, 0
        for batch in islice(batches, accumulation):
            batch = {k: v.to(s.device) for k, v in batch.items()}
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()  # DeepSpeed updates the weights only on the last micro-step
            loss_sum += loss.item() / accumulation
            tokens += int(batch["attention_mask"].sum()) if unit == "tokens" else len(batch["labels"])
        state.step, state.micro_step = step, state.micro_step + accumulation
        state.epoch, state.position = batches.epoch, batches.position
        # One all_reduce per step carries the loss, the token count and the stop request, so every
        # rank stops after the same step even if only some of them see the file yet.
        asked = float(bool(args.stop_file) and os.path.exists(args.stop_file))
        loss_mean, tokens_total, stop = _mean_across_ranks([loss_sum, float(tokens), asked], s.device)
        tokens_total *= s.world
        elapsed = time.perf_counter() - started
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        lr = engine.get_lr()[0]
        if writer:
            writer.add_scalar("train/loss", loss_mean, step)
            writer.add_scalar("train/lr", lr, step)
            writer.add_scalar("train/grad_norm", grad_norm, step)
            writer.add_scalar(f"train/{unit}_per_s", tokens_total / elapsed, step)
        if step % cfg.train.log_every == 0 or step == s.total_steps:
            _log(rank, f"step {step}/{s.total_steps}  loss {loss_mean:.4f}  lr {lr:.3g}  "
                       f"grad_norm {grad_norm:.3g}  {tokens_total / elapsed:,.0f} {unit}/s  {elapsed:.2f} s/step")

        is_last = step == s.total_steps
        stopping = stop > 0 and not is_last
        metrics: dict[str, float] = {"step": step, "train_loss": loss_mean}
        if step % cfg.train.eval_every == 0 or is_last:
            val = scalars(evaluate_split(cfg, s, "validation")[0])
            metrics.update({f"val_{k}": v for k, v in val.items()})
            if writer:
                for k, v in val.items():
                    writer.add_scalar(f"val/{k}", v, step)
                writer.flush()
        if stopping:
            metrics["stopped"] = 1.0
            _log(rank, f"stop requested: checkpointing step {step} and stopping")
        if step % cfg.train.save_interval == 0 or is_last or stopping:
            state.metrics = {k: v for k, v in metrics.items() if k.startswith("val_")}
            with tempfile.TemporaryDirectory(prefix="sft-shard-") as shard_dir:
                checkpoints.save(engine, Path(shard_dir), state, rank)
                reporter.report(metrics, Path(shard_dir), checkpoints.dir_name(step))
        elif "val_loss" in metrics:
            reporter.report(metrics)
        if stopping:
            break
    if writer:
        writer.close()
    dist.barrier()
    return state


def run_test(cfg: RunConfig, reporter: Reporter, args: WorkerArgs) -> dict:
    """Test metrics before fine-tuning and from the final sharded checkpoint; rank 0 then exports."""
    s = setup(cfg, args, ("test",))
    before, _ = evaluate_split(cfg, s, "test")
    # The weights come from the shards on disk, not from any model still in memory.
    state = checkpoints.load(s.engine, Path(args.final_checkpoint), s.rank, load_optimizer=False)
    after, rows = evaluate_split(cfg, s, "test")
    if s.rank == 0 and args.predictions_path and rows:
        Path(args.predictions_path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    if s.rank == 0 and args.export_dir:
        from trainer.export import export_model
        export_model(cfg, Path(args.final_checkpoint), Path(args.export_dir), s.processor, s.labels, args.cache_dir)
        _log(s.rank, f"exported the consolidated model to {args.export_dir}")
    result = {"before": before, "after": after, "step": state.step}
    reporter.report(result)
    return result
