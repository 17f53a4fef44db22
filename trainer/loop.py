"""The per-worker fine-tuning loop. Every rank runs exactly these functions.

`run` trains (with validation and checkpoints); `run_test` evaluates the test split before
fine-tuning and from the final sharded checkpoint on disk, then rank 0 exports the consolidated
model; `fine_tune` does one after the other in the same processes, with a fresh model and engine
for the test (trainer/worker.py builds them). The process group exists already (the orchestrator
made it). Talks to the orchestrator only through `reporter`; never imports ray. What differs
between tasks comes from the task's module.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import replace
from itertools import islice
from pathlib import Path

from trainer import checkpoints, early_stopping, reference, schedule, sequence_parallel
from trainer.checkpoints import TrainState
from trainer.config import RunConfig
from trainer.config_checks import generate_examples, generates_test
from trainer.data import micro_batches
from trainer.engine import grad_norm, release_engine
from trainer.evaluation import scalars
from trainer.generation import before_after, markdown_table, text_metrics, write_jsonl
from trainer.jobs import WorkerArgs
from trainer.messages import StepMetrics, TestResult, TrainReport
from trainer.report import Phases, Reporter
from trainer.storage import writing
from trainer.tasks.registry import TASKS
from trainer.worker import evaluate_split, generate_split, one_pass, setup


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


def run(cfg: RunConfig, reporter: Reporter, args: WorkerArgs) -> tuple[TrainState, bool]:
    """Train, validate every eval_every steps, checkpoint every save_every, report both; stop early
    when validation stops improving (train.early_stopping). Returns the state and whether the run
    stopped on request (before its end: no test evaluation follows)."""
    import torch.distributed as dist

    start_from = args.restart_from or args.resume_from
    stored = reference.ensure(cfg, args, reporter)  # a preference objective's reference pass, once (its engine released)
    s = setup(cfg, args, ("train", "validation"), reporter, start_from, reference_folder=stored)
    engine, rank = s.engine, s.rank
    log = reporter.log if rank == 0 else (lambda text: None)
    fresh = TrainState(step=0, micro_step=0, world_size=s.world, zero_stage=cfg.deepspeed.zero_stage,
                       model=s.model_id, trainable=s.trainable_digest, lean=checkpoints.is_lean(cfg))
    state = checkpoints.restore(engine, start_from, fresh, rank, cfg.train.early_stopping, log)

    track = reporter.track if rank == 0 else (lambda metrics: None)  # the controller writes the tracker
    sp = s.parallel  # a sequence-parallel group reads one micro-batch, each rank its part of the positions
    accumulation, unit = schedule.accumulation(cfg.scaling, cfg.train, sp.dp_world), TASKS[cfg.model.task].unit
    batches = micro_batches(cfg, s.data["train"], sp.dp_rank, sp.dp_world, state.epoch, state.position)
    rows = "packed rows" if s.data["train"].packed else "examples"
    split = f" (each sequence split over {sp.size}: {sp.dp_world} data-parallel)" if sp.on else ""
    scale = sequence_parallel.loss_scale(cfg.deepspeed.zero_stage, sp.size)
    log(f"training steps {state.step + 1}..{s.total_steps} on {s.world} worker(s){split}, "
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
            if sp.on:
                batch = sequence_parallel.shard(batch, sp.rank, sp.size, cfg.train.micro_batch_size)
            places += batch["input_ids"].numel() if "input_ids" in batch else 0
            loss = s.task.loss(engine, batch, s.shard.loss_impl, cfg)  # the task's objective
            engine.backward(loss * scale if scale != 1 else loss)
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
        # Sequence parallel: each rank's loss is its part of its group's mean, its units the group's.
        loss_mean, units_total = loss_total / sp.dp_world, units_total / sp.size
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
                answers = generate_split(s, cfg, "validation", generate_examples(cfg), reporter)
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
    release_engine(engine)  # ZeRO's hooks (and ZeRO-3's module stack) would keep it alive for the test
    return state, state.step < s.total_steps and not state.stopped_early


def run_test(cfg: RunConfig, reporter: Reporter, args: WorkerArgs) -> TestResult:
    """Test metrics before fine-tuning and from the final sharded checkpoint (with the answers to every
    test prompt, each time, for tasks that generate); rank 0 then exports, once every rank's test engine
    is released (the export builds no model: trainer/export.py)."""
    import gc

    import torch.distributed as dist

    phases = Phases(reporter if dist.get_rank() == 0 else None)  # each part's seconds, on the console
    stored = reference.ensure(cfg, args, reporter)  # stored by training already (a search's test group reads it)
    s = setup(cfg, args, ("test",), reporter, args.final_checkpoint, reference_folder=stored)
    answering = len(s.data["test"]) if generates_test(cfg) else 0  # every test prompt, or none
    phases.done("test phase: the model and engine built")
    with one_pass(s):
        before, _ = evaluate_split(s, "test")
        answered_before = generate_split(s, cfg, "test", answering, reporter)
    phases.done(f"test phase: the model before fine-tuning evaluated{f' and {answering} prompts answered' if answering else ''}")
    # The weights come from the shards on disk, not from any model still in memory.
    final = Path(args.final_checkpoint)
    own = checkpoints.own_partition_fits(s.engine, checkpoints.read_state(final))  # ZeRO-3: no consolidation
    state = checkpoints.load(s.engine, final, s.rank, load_optimizer=False)
    with one_pass(s):
        after, rows = evaluate_split(s, "test")
        answered_after = generate_split(s, cfg, "test", answering, reporter)
    phases.done(f"test phase: step {state.step} loaded{' (each rank its own shard)' if own else ''} and evaluated"
                f"{f' and {answering} prompts answered' if answering else ''}")
    if s.rank == 0 and args.predictions_path and rows:
        with writing("the test predictions", args.predictions_path):
            Path(args.predictions_path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    if answering:
        before, after = {**before, **text_metrics(answered_before)}, {**after, **text_metrics(answered_after)}
        if s.rank == 0 and args.test_generations_path:
            with writing("the generated test answers", args.test_generations_path):
                write_jsonl(Path(args.test_generations_path), before_after(answered_before, answered_after))
    rank, processor, labels, precision = s.rank, s.processor, s.labels, s.precision
    # The export reads the checkpoint on disk; the test's engine and model go first, so that no rank
    # holds two models (trainer/engine.py release_engine: under ZeRO-3 destroy() alone is not enough).
    release_engine(s.engine)
    del s
    gc.collect()
    phases.done("test phase: the test engine released")  # bench/memory.py: the export phase starts here
    if rank == 0 and args.export_dir:
        from trainer.export import export_dtype, export_model
        dtype = export_dtype(cfg, precision)
        with writing("the exported model", args.export_dir):
            how = export_model(cfg, Path(args.final_checkpoint), Path(args.export_dir), processor, labels,
                               args.cache_dir, dtype)
        phases.done(f"exported the consolidated model ({dtype}, {how}) to {args.export_dir}")
    result = TestResult(state.step, before, after, str(args.final_checkpoint))
    reporter.report(result)
    return result
