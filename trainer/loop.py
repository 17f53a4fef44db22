"""The per-worker fine-tuning loop. Every rank runs exactly these functions.

`run` trains (with validation and checkpoints); `run_test` evaluates the test split before
fine-tuning and from the final sharded checkpoint on disk, then rank 0 exports the consolidated
model; `fine_tune` does one after the other in the same processes, with a fresh model and engine
for the test. The process group exists already (the orchestrator made it). Talks to the
orchestrator only through `reporter`; never imports ray. What differs between tasks comes from the
task's module.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Optional

from trainer import checkpoints, data_cache, early_stopping, mixing
from trainer.checkpoints import TrainState
from trainer.config import ConfigError, RunConfig
from trainer.data import MicroBatches
from trainer.ds_config import deepspeed_config, resolve_precision
from trainer.evaluation import Shard, generator
from trainer.generation import before_after, markdown_table, text_metrics, write_jsonl
from trainer.jobs import WorkerArgs
from trainer.lora import trainable_model
from trainer.messages import StepMetrics, TestResult, TrainReport
from trainer.model import (build_model, full_shape, load_processor, model_config, partitioned_build, prepare_pretrained,
                           share_fp32_partitions)
from trainer.report import Phases, Reporter
from trainer.splits import total_steps
from trainer.storage import writing
from trainer.tasks.common import Prepared
from trainer.tasks.registry import Task, get_task
from trainer.zero3_generation import GenerationWeights, generation_weights


@dataclass
class Setup:
    task: Task
    engine: Any
    processor: Any  # tokenizer, or image processor
    shard: Shard  # this rank's part of an evaluation
    data: dict[str, Prepared]
    labels: list[str]  # label names of classification tasks
    total_steps: int
    rank: int
    world: int
    model_id: str
    trainable_digest: str
    precision: str  # fp32, bf16 or fp16: what the engine trains in
    # () -> a context around an evaluation or generation pass: under ZeRO-3 the whole model gathered
    # for it, or synced (trainer/zero3_generation.py); other stages hold the whole model already.
    whole_model: Callable[[], ContextManager[GenerationWeights]]
    generation: Optional[GenerationWeights] = None  # how the last generation pass ran
    passing: Optional[GenerationWeights] = None  # the pass in progress (see one_pass)


def setup(cfg: RunConfig, args: WorkerArgs, splits: tuple[str, ...], reporter: Reporter,
          checkpoint: Optional[str] = None) -> Setup:
    """Model, freezing, data and DeepSpeed engine, identical on every rank; the engine ready to load
    `checkpoint` (of another world size too: checkpoints.universal_copy)."""
    import deepspeed
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    # DeepSpeed 0.19.8 (private): the shared-memory all-reduce op is JIT-compiled on first use (by
    # init_distributed) and serves only inference; mark it incompatible so it is never built.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed()  # adopts the orchestrator's process group; zero.Init needs it to build
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    if not on_gpu:
        torch.set_num_threads(args.threads)
    if not args.verbose:
        import transformers

        transformers.utils.logging.disable_progress_bar()  # one "Loading weights" bar per rank otherwise
    precision = resolve_precision(cfg.deepspeed.precision, on_gpu, on_gpu and torch.cuda.is_bf16_supported())

    task = get_task(cfg.model.task)
    model_dir = prepare_pretrained(cfg.model, args.cache_dir)
    processor = load_processor(cfg.model, model_dir)
    if args.data_dir:
        prepared = data_cache.load(Path(args.data_dir))  # memory-mapped
        if rank == 0:
            reporter.log(f"data: cached ({args.data_dir})")
    else:
        prepared = data_cache.prepare(cfg, processor, None)
    labels, data = prepared.labels, {name: prepared.splits[name] for name in splits}
    model_id = checkpoints.model_identity(cfg.model)
    universal = checkpoint is not None and checkpoints.universal_copy(
        Path(checkpoint), model_id, world, rank, reporter.log if rank == 0 else (lambda text: None))
    ds_config = deepspeed_config(cfg, world, precision, load_universal=universal,
                                 hidden_size=getattr(model_config(cfg.model, model_dir), "hidden_size", None))
    torch.manual_seed(cfg.seed)  # same seed on all ranks: identical initial weights and heads
    with partitioned_build(ds_config):  # ZeRO-3: no rank ever holds the whole model
        model = build_model(cfg.model, model_dir, labels)
    if getattr(model.config, "use_cache", False):
        # Training needs no key/value cache; without one, transformers reads packed rows' position_ids
        # as separate sequences (no attention across examples).
        model.config.use_cache = False
    if cfg.train.gradient_checkpointing:
        # use_reentrant=False: correct with frozen blocks (no input needs a gradient) and with ZeRO-3.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model, trainable = trainable_model(model, cfg.finetune)  # freezing rules, or LoRA adapters
    torch.manual_seed(cfg.seed + 1000 * (rank + 1))  # dropout differs across ranks, reproducibly

    t = cfg.train
    steps = total_steps(len(prepared.splits["train"]), world, t.micro_batch_size, t.gradient_accumulation, t.epochs,
                        t.max_steps)

    # Freeze first: ZeRO partitions and the optimizer hold only what they are given.
    decay = [p for p in model.parameters() if p.requires_grad and len(full_shape(p)) >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and len(full_shape(p)) < 2]
    groups = [g for g in ({"params": decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    warmup = cfg.optim.warmup_steps or math.ceil(cfg.optim.warmup_ratio * steps)

    def scheduler(optimizer):
        from transformers import get_scheduler
        return get_scheduler(cfg.optim.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=steps)

    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, lr_scheduler=scheduler,
                                      config=ds_config)
    share_fp32_partitions(engine)  # ZeRO-3 in fp32: no second copy of the weights' partition
    shard = Shard(lambda batch: engine(**batch).logits, task.collator(processor), rank, world,
                  cfg.train.micro_batch_size, device, model=engine)
    whole_model = partial(generation_weights, engine, cfg.eval.generate.zero3, cfg.deepspeed.zero_stage, world, device)
    return Setup(task, engine, processor, shard, data, labels, steps, rank, world,
                 model_id, checkpoints.trainable_digest(trainable), precision, whole_model)


@contextmanager
def one_pass(s: Setup) -> Iterator[GenerationWeights]:
    """The weights for the evaluation and generation passes inside: under ZeRO-3 gathered once for
    all of them (s.whole_model); a pass opened inside another joins it, gathering nothing again."""
    if s.passing is not None:
        yield s.passing
        return
    with s.whole_model() as way:
        s.passing = way
        try:
            yield way
        finally:
            s.passing = None


def evaluate_split(s: Setup, split: str) -> tuple[dict, list[dict]]:
    """Metrics of the engine's current weights on a split (each example counted once across ranks),
    and the per-example predictions of tasks that have them. Under ZeRO-3 on the whole model gathered
    where eval.generate.zero3 allows (no all-gather per forward pass)."""
    s.engine.eval()
    try:
        with one_pass(s):
            return s.task.evaluate(s.shard, s.data[split], s.labels)
    finally:
        s.engine.train()


def generate_split(s: Setup, cfg: RunConfig, split: str, count: int, reporter: Reporter) -> list[dict]:
    """Answers to the first `count` prompts of a split with the engine's current weights (every rank
    together; each example once), by id; [] when count is 0. Under ZeRO-3 the pass runs on the whole
    model gathered, or synced (trainer/zero3_generation.py); rank 0 says which when it changes."""
    count = min(count, len(s.data[split]))
    if not count:
        return []
    s.engine.eval()
    try:
        with one_pass(s) as way:
            if s.rank == 0 and cfg.deepspeed.zero_stage == 3 and way.gathered != getattr(s.generation, "gathered", None):
                reporter.log(way.describe())
            s.generation = way
            shard = replace(s.shard, generate=generator(s.engine.module, synced=way.synced))
            return s.task.generate(shard, s.data[split], s.processor, count, cfg.eval.generate)
    finally:
        s.engine.train()


def scalars(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k not in ("tokens", "examples")}


def grad_norm(parameters) -> float:
    """The global L2 norm of the gradients (the averaged ones, at an accumulation boundary)."""
    import torch

    norms = [torch.linalg.vector_norm(p.grad.float()) for p in parameters if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def fine_tune(cfg: RunConfig, reporter: Reporter, args: WorkerArgs) -> None:
    """Train; then, unless a stop was asked for, test the final checkpoint as it lies on disk."""
    import gc

    import torch.distributed as dist

    state, stopped = run(cfg, reporter, args)
    if stopped or not args.test_after:
        return
    gc.collect()  # the training engine (weights, gradients, optimizer states) goes before the test's
    root = Path(args.checkpoint_root)
    written = root / checkpoints.dir_name(state.step)
    final = written if written.is_dir() else Path(args.restart_from or args.resume_from)
    # Rank 0 chooses and tells the others: the ranks test the same one, whatever the controller prunes.
    chosen = [str(checkpoints.to_test(root.parent, root, cfg.test.checkpoint, *early_stopping.selection(cfg), final))
              if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(chosen, src=0)
    if dist.get_rank() == 0:
        reporter.log(f"test evaluation on the {cfg.test.checkpoint} checkpoint {chosen[0]} (and on the model "
                     f"before fine-tuning)", after_training=True)
    run_test(cfg, reporter, replace(args, final_checkpoint=chosen[0]))


def micro_batches(cfg: RunConfig, train: Prepared, rank: int, world: int, state: TrainState) -> MicroBatches:
    """This rank's stream of training micro-batches from the saved data position; a training mix
    draws from its sources by their weights (trainer/mixing.py)."""
    parts, weights = train.parts, [source.weight for source in cfg.data.sources]
    order = (lambda epoch: mixing.epoch_order(parts, weights, cfg.seed, epoch)) if len(parts) > 1 else None
    return MicroBatches(train, rank, world, cfg.train.micro_batch_size, cfg.seed, epoch=state.epoch,
                        position=state.position, order=order)


def run(cfg: RunConfig, reporter: Reporter, args: WorkerArgs) -> tuple[TrainState, bool]:
    """Train, validate every eval_every steps, checkpoint every save_every, report both; stop early
    when validation stops improving (train.early_stopping). Returns the state and whether the run
    stopped on request (before its end: no test evaluation follows)."""
    import torch.distributed as dist

    start_from = args.restart_from or args.resume_from
    s = setup(cfg, args, ("train", "validation"), reporter, start_from)
    engine, rank = s.engine, s.rank
    log = reporter.log if rank == 0 else (lambda text: None)
    state = TrainState(step=0, micro_step=0, world_size=s.world, zero_stage=cfg.deepspeed.zero_stage,
                       model=s.model_id, trainable=s.trainable_digest, lean=checkpoints.is_lean(cfg))
    if start_from:
        state = checkpoints.load(engine, Path(start_from), rank)
        state.trainable, state.world_size, state.lean = s.trainable_digest, s.world, checkpoints.is_lean(cfg)
        log(f"resumed from {start_from} at step {state.step}")
    if cfg.train.early_stopping is not None:
        early = cfg.train.early_stopping
        kept = early_stopping.carry_over(state.best_metric, state.bad_evaluations, state.best_of, early)
        if state.best_metric is not None and kept[0] is None:
            log(f"early stopping now counts {early_stopping.counted(early)}, not {state.best_of}: patience starts again")
        (state.best_metric, state.bad_evaluations), state.best_of = kept, early_stopping.counted(early)

    track = reporter.track if rank == 0 else (lambda metrics: None)  # the controller writes the tracker
    accumulation, unit = cfg.train.gradient_accumulation, s.task.UNIT
    batches = micro_batches(cfg, s.data["train"], rank, s.world, state)
    rows = "packed rows" if s.data["train"].packed else "examples"
    log(f"training steps {state.step + 1}..{s.total_steps} on {s.world} worker(s), "
        f"{len(s.data['train']):,} training {rows}, {len(s.data['validation']):,} validation examples")
    # ZeRO's optimizers compute the global gradient norm; on stage 0 nothing does, so the loop does.
    own_norm = cfg.deepspeed.zero_stage == 0
    params = [p for p in engine.module.parameters() if p.requires_grad] if own_norm else []
    engine.train()
    # A run that stopped early ended there: a restart from that checkpoint goes on to the test.
    end = state.step if state.stopped_early else s.total_steps
    for step in range(state.step + 1, end + 1):
        started, loss_sum, units, places, norm = time.perf_counter(), 0.0, 0, 0, float("nan")
        for examples in islice(batches, accumulation):
            units += s.task.count(examples)
            batch = {k: v.to(s.shard.device) for k, v in s.shard.collate(examples).items()}
            places += batch["input_ids"].numel() if "input_ids" in batch else 0
            loss = s.task.loss(engine, batch)  # the task's objective
            engine.backward(loss)
            if own_norm and engine.is_gradient_accumulation_boundary():
                norm = grad_norm(params)  # the gradients are averaged across ranks by now
            engine.step()  # DeepSpeed updates the weights only on the last micro-step
            loss_sum += loss.item() / accumulation
        state.step, state.micro_step = step, state.micro_step + accumulation
        state.epoch, state.position = batches.epoch, batches.position
        # One all_reduce per step carries the loss, the unit count and the stop request, so every
        # rank stops after the same step even if only some of them see the file yet.
        asked = float(bool(args.stop_file) and os.path.exists(args.stop_file))
        loss_total, units_total, places_total, stop = s.shard.sum([loss_sum, float(units), float(places), asked])
        loss_mean = loss_total / s.world
        elapsed = time.perf_counter() - started
        if not own_norm:
            norm = engine.get_global_grad_norm()
            norm = float(norm) if norm is not None else float("nan")
        lr = engine.get_lr()[0]
        tracked = {"train/loss": loss_mean, "train/lr": lr, "train/grad_norm": norm,
                   f"train/{unit}_per_s": units_total / elapsed}
        if places_total:  # token batches: the share of padding among the positions computed
            tracked["train/padding_fraction"] = 1 - units_total / places_total
        texts = {}
        if step % cfg.train.log_every == 0 or step == s.total_steps:
            log(f"step {step}/{s.total_steps}  loss {loss_mean:.4f}  lr {lr:.3g}  grad_norm {norm:.3g}  "
                f"{units_total / elapsed:,.0f} {unit}/s  {elapsed:.2f} s/step")

        is_last = step == s.total_steps
        stopping = stop > 0 and not is_last
        validation: dict[str, float] = {}
        if step % cfg.train.eval_every == 0 or is_last:
            with one_pass(s):  # ZeRO-3: one gather for both
                validation = scalars(evaluate_split(s, "validation")[0])
                answers = generate_split(s, cfg, "validation", cfg.generate_examples, reporter)
            if rank == 0 and answers and args.generations_dir:
                target = Path(args.generations_dir) / f"{checkpoints.dir_name(step)}.jsonl"
                with writing(f"the generated answers of step {step}", target):
                    write_jsonl(target, answers)
            if answers:
                texts["val/generations"] = markdown_table(answers)
        track(StepMetrics(step, tracked, texts))  # val/* come with the report below
        early = cfg.train.early_stopping
        if early is not None and validation:
            # The metrics are all-reduced: every rank counts the same and stops after the same step.
            state.best_metric, state.bad_evaluations = early_stopping.advance(state.best_metric, state.bad_evaluations,
                                                                              validation, early)
            state.stopped_early = state.bad_evaluations >= early.patience and not is_last
            stopping = stopping and not state.stopped_early  # the run ends here anyway, and goes on to the test
        if stopping:
            log(f"stop requested: checkpointing step {step} and stopping")
        report = TrainReport(step, loss_mean, validation, final=is_last or state.stopped_early, stopped=stopping,
                             stopped_early=state.stopped_early)
        if step % cfg.train.save_interval == 0 or is_last or stopping or state.stopped_early:
            state.validation = validation
            with tempfile.TemporaryDirectory(prefix="sft-shard-") as shard_dir:
                with writing(f"rank {rank}'s part of the checkpoint of step {step}", shard_dir):
                    checkpoints.save(engine, Path(shard_dir), state, rank)
                reporter.report(report, Path(shard_dir))
        elif validation:
            reporter.report(report)
        if stopping or state.stopped_early:
            break
    dist.barrier()  # every rank's shard of the last checkpoint is persisted
    engine.destroy()  # ZeRO's gradient hooks would keep the engine (all its states) alive for the test
    return state, state.step < s.total_steps and not state.stopped_early


def run_test(cfg: RunConfig, reporter: Reporter, args: WorkerArgs) -> TestResult:
    """Test metrics before fine-tuning and from the final sharded checkpoint (with the answers to every
    test prompt, each time, for tasks that generate); rank 0 then exports."""
    import torch.distributed as dist

    phases = Phases(reporter if dist.get_rank() == 0 else None)  # each part's seconds, on the console
    s = setup(cfg, args, ("test",), reporter, args.final_checkpoint)
    answering = len(s.data["test"]) if cfg.generates_test else 0  # every test prompt, or none
    phases.done("test phase: the model and engine built")
    with one_pass(s):
        before, _ = evaluate_split(s, "test")
        answered_before = generate_split(s, cfg, "test", answering, reporter)
    phases.done(f"test phase: the model before fine-tuning evaluated{f' and {answering} prompts answered' if answering else ''}")
    # The weights come from the shards on disk, not from any model still in memory.
    state = checkpoints.load(s.engine, Path(args.final_checkpoint), s.rank, load_optimizer=False)
    with one_pass(s):
        after, rows = evaluate_split(s, "test")
        answered_after = generate_split(s, cfg, "test", answering, reporter)
    phases.done(f"test phase: step {state.step} loaded and evaluated{f' and {answering} prompts answered' if answering else ''}")
    if s.rank == 0 and args.predictions_path and rows:
        with writing("the test predictions", args.predictions_path):
            Path(args.predictions_path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    if answering:
        before, after = {**before, **text_metrics(answered_before)}, {**after, **text_metrics(answered_after)}
        if s.rank == 0 and args.test_generations_path:
            with writing("the generated test answers", args.test_generations_path):
                write_jsonl(Path(args.test_generations_path), before_after(answered_before, answered_after))
    if s.rank == 0 and args.export_dir:
        from trainer.export import export_dtype, export_model
        dtype = export_dtype(cfg, s.precision)
        with writing("the exported model", args.export_dir):
            export_model(cfg, Path(args.final_checkpoint), Path(args.export_dir), s.processor, s.labels,
                         args.cache_dir, dtype)
        phases.done(f"exported the consolidated model ({dtype}) to {args.export_dir}")
    result = TestResult(state.step, before, after, str(args.final_checkpoint))
    reporter.report(result)
    return result
