"""Preflight: everything that can be checked before a worker starts, and the plan it prints.

Reads the data files and their columns, loads the tokenizer and the model's config, applies the
freezing rules to a meta-device skeleton (no weights loaded), and derives batch sizes and steps.
A failure is a ConfigError naming the key or file; nothing here starts Ray. Never imports deepspeed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from trainer.config import ConfigError, RunConfig
from trainer.config_checks import generate_examples, generates_test
from trainer.zero3_generation import HEADROOM


@dataclass(frozen=True)
class Plan:
    world_size: int
    micro_batch_size: int
    global_batch_size: int
    rows: dict[str, int]
    steps: int
    trainable: int
    total: int
    freezing: str
    model_dir: str | None
    labels: tuple[str, ...] = ()
    trainable_digest: str = ""
    checkpoint_bytes: int = 0  # estimated size of one checkpoint on disk
    vocab_size: int = 0  # the model's vocabulary (causal LMs: the logits term of the memory estimate)
    loss_impl: str = "standard"  # train.loss_impl as CPU workers resolve it (trainer/chunked_loss.py)
    largest: int = 0  # elements of the largest parameter (what the streamed export holds at once)
    data_dir: Optional[str] = None  # the prepared data the workers load (make_plan's data_root)
    # A training mix: (path, weight, rows, share of an epoch's draws) per source.
    sources: tuple[tuple[str, float, int, float], ...] = ()
    reading: tuple[str, ...] = ()  # how the task reads the splits ("<split>: <how>"; one line when all agree)


SAMPLE_ROWS = 200  # rows of each split prepared in preflight: bad data fails before any worker starts


def make_plan(cfg: RunConfig, cache_dir: str) -> Plan:
    """Check what the config, the data and the model's config can tell together, as the workers
    will see it: the task's own column checks and preparation run on the first rows of each split.
    Steps count the source rows (see with_prepared_data)."""
    from trainer.checkpoints import is_lean, trainable_digest
    from trainer.chunked_loss import loss_implementation
    from trainer.data import load_splits
    from trainer.data_cache import training_labels
    from trainer.ds_config import deepspeed_config
    import torch

    from trainer.freezing import describe_layout, summarize
    from trainer.lora import lora_layout, trainable_model
    from trainer.model import build_skeleton, load_processor, prepare_pretrained
    from trainer.schedule import check_elastic, steps_of_run
    from trainer.tasks.common import require_rows
    from trainer.tasks.registry import get_task

    check_elastic(cfg)  # every worker count it may be resized to keeps the global batch
    task = get_task(cfg.model.task)
    sources, validation, test = load_splits(cfg)
    splits = (*sources, validation, test)
    notes = []
    for split in splits:
        require_rows(split)
        notes.append(task.check_columns(split, cfg.data))
    labels = training_labels(cfg, task, sources)
    model_dir = prepare_pretrained(cfg.model, cache_dir)
    processor = load_processor(cfg.model, model_dir)
    for split in splits:
        task.prepare(split.sample(SAMPLE_ROWS), cfg, processor, labels)
    check_model_fits(cfg, model_dir, processor, labels)
    deepspeed_config(cfg, cfg.scaling.data_parallel_size, "fp32")  # the user's DeepSpeed JSON, checked now
    skeleton = build_skeleton(cfg.model, model_dir, labels)
    freezing = ""
    if cfg.finetune.mode == "lora":
        freezing = lora_layout(skeleton, cfg.finetune, describe_layout(skeleton)).describe(cfg.finetune) + "; "
    with torch.device("meta"):  # adapters on the skeleton: names and sizes, no memory
        skeleton, trainable = trainable_model(skeleton, cfg.finetune)
    sizes = [(n, p.numel()) for n, p in skeleton.named_parameters()]
    layout = describe_layout(skeleton)
    world = cfg.scaling.world_size
    t = cfg.train
    rows = {"train": sum(len(s) for s in sources), "validation": len(validation), "test": len(test)}

    def steps() -> int:  # batches count data-parallel ranks (scaling.sequence_parallel splits sequences)
        return steps_of_run(cfg, rows["train"], cfg.scaling.data_parallel_size)

    n_total, n_trainable = sum(s for _, s in sizes), sum(s for n, s in sizes if n in trainable)
    # fp32 weights of every parameter, plus Adam's two fp32 moments (and fp32 master weights in
    # bf16/fp16) of the trainable ones; ZeRO splits this across ranks but not below it.
    per_trainable = 8 + (4 if cfg.deepspeed.precision in ("bf16", "fp16") else 0)
    return Plan(
        world_size=world, micro_batch_size=t.micro_batch_size,
        global_batch_size=t.micro_batch_size * t.gradient_accumulation * cfg.scaling.data_parallel_size,
        rows=rows,
        steps=steps(),
        trainable=n_trainable, total=n_total, largest=max((s for _, s in sizes), default=0),
        freezing=freezing + summarize(sizes, trainable, layout), model_dir=model_dir, labels=tuple(labels),
        trainable_digest=trainable_digest(trainable),
        checkpoint_bytes=4 * (n_trainable if is_lean(cfg) else n_total) + per_trainable * n_trainable,
        reading=reading_lines([n for n in notes if n]),
        vocab_size=int(getattr(skeleton.config, "vocab_size", 0) or 0),
        loss_impl=loss_implementation(cfg, skeleton.config, on_cuda=False, has_liger=False).name)


def reading_lines(notes: list[str]) -> tuple[str, ...]:
    """The task's notes on each split ("<split>: <how>"), as one line when every split reads alike."""
    hows = {n.split(": ", 1)[1] for n in notes}
    return (f"all splits: {hows.pop()}",) if len(hows) == 1 and len(notes) > 1 else tuple(notes)


def with_prepared_data(plan: Plan, cfg: RunConfig, data_root: Path, log: Callable[[str], None]) -> Plan:
    """Prepare every split once (or find it prepared) under `data_root` for the workers; the plan's
    rows and steps then count the prepared (packed) examples."""
    from dataclasses import replace

    from trainer import data_cache
    from trainer.model import load_processor
    from trainer.schedule import steps_of_run

    prepared = data_cache.prepare(cfg, load_processor(cfg.model, plan.model_dir), data_root, log)
    for line in prepared.describe():
        log(f"data: {line}")
    rows = {name: len(p) for name, p in prepared.splits.items()}
    steps = steps_of_run(cfg, rows["train"], cfg.scaling.data_parallel_size)
    return replace(plan, rows=rows, steps=steps, data_dir=str(prepared.directory),
                   sources=mix_shares(cfg, prepared.splits["train"].parts))


def mix_shares(cfg: RunConfig, parts: tuple[int, ...]) -> tuple[tuple[str, float, int, float], ...]:
    """(path, weight, rows, share of an epoch's draws) of each source of a training mix; () for one source."""
    from trainer.mixing import draws_per_source

    if len(parts) < 2:
        return ()
    weights = [s.weight for s in cfg.data.sources]
    draws = draws_per_source(parts, weights)
    return tuple((s.path, s.weight, n, d / sum(draws)) for s, n, d in zip(cfg.data.sources, parts, draws))


def check_model_fits(cfg: RunConfig, model_dir: str | None, processor, labels: list[str]) -> None:
    """data.max_length within the model's positions; a pretrained task head of the right size; an
    attention implementation the workers can run."""
    import importlib.util

    from trainer.chunked_loss import loss_implementation
    from trainer.model import head_mismatch, model_config, position_limit
    from trainer.sequence_parallel import head_refusal
    from trainer.tasks.registry import TASKS

    if cfg.model.attn_implementation == "flash_attention_2" and (
            importlib.util.find_spec("flash_attn") is None or cfg.scaling.gpus_per_worker == 0):
        raise ConfigError("model.attn_implementation: flash_attention_2 needs a CUDA GPU per worker and the "
                          "flash-attn package (pip install flash-attn); it is "
                          f"{'not installed' if importlib.util.find_spec('flash_attn') is None else 'asked for on CPU workers'}"
                          "; use sdpa or auto")
    if cfg.finetune.lora.quantize:
        gpu = cfg.scaling.gpus_per_worker != 0 and importlib.util.find_spec("bitsandbytes") is not None
        raise ConfigError(
            "finetune.lora.quantize: 4bit (QLoRA) keeps the frozen base in 4 bits with bitsandbytes, which runs on "
            "CUDA GPUs only; " + ("this version of sft does not build 4-bit models under DeepSpeed yet" if gpu else
                                  "the workers here have no GPU (or bitsandbytes is not installed)")
            + "; remove finetune.lora.quantize to train LoRA adapters on the full-precision base")
    config = model_config(cfg.model, model_dir)
    if refusal := head_refusal(config, cfg.scaling.sequence_parallel):
        raise ConfigError(f"scaling.sequence_parallel = {cfg.scaling.sequence_parallel}: {refusal} (Ulysses gives "
                          f"each rank of a sequence a share of the heads); choose a divisor of the heads")
    # chunked on a model with transformed logits, liger without CUDA or the package: refused now
    loss_implementation(cfg, config, on_cuda=cfg.scaling.gpus_per_worker != 0,
                        has_liger=importlib.util.find_spec("liger_kernel") is not None)
    limit = position_limit(config, processor) if TASKS[cfg.model.task].processor == "tokenizer" else None
    if limit and cfg.data.max_length > limit[0]:
        raise ConfigError(f"data.max_length = {cfg.data.max_length} is longer than the model can take: "
                          f"{limit[0]} positions ({limit[1]}); set data.max_length to {limit[0]} or less")
    mismatch = head_mismatch(config, TASKS[cfg.model.task].auto_model, labels) if cfg.model.name_or_path else None
    if mismatch and not cfg.model.reinit_head:
        raise ConfigError(f"model.name_or_path: {mismatch}; set model.reinit_head: true to train a fresh head "
                          f"for these labels, or give the data the model's own label set (data.labels)")


def memory_line(plan: Plan, cfg: RunConfig) -> str:
    """Expected model-state memory per worker (weights, gradients, optimizer states) in training, in
    the test evaluation and in rank 0's export, and which of the three is the run's peak."""
    from trainer.ds_config import export_bytes, model_state_bytes, test_phase_bytes, weight_width

    stage, world = cfg.deepspeed.zero_stage, plan.world_size

    def phases(precision: str) -> dict[str, dict[str, int]]:
        exported = precision if cfg.export.dtype == "auto" else cfg.export.dtype
        # peft's adapter folder (export.lora: adapter | both) is written from the whole model, built
        streamed = cfg.finetune.mode != "lora" or cfg.export.lora == "merged"
        return {"training steps": model_state_bytes(plan.total, plan.trainable, stage, world, precision),
                "test evaluation": test_phase_bytes(plan.total, plan.trainable, stage, world, precision,
                                                    cfg.eval.generate.zero3 != "synced"),
                "export": {"streamed" if streamed else "built model":
                           export_bytes(plan.total, plan.largest, streamed, weight_width(exported))}}

    def text(precision: str) -> str:
        shown = {phase: f"{sum(parts.values()) / 2**30:.2f} GiB ("
                        + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in parts.items()) + ")"
                 for phase, parts in phases(precision).items()}
        peak = max(phases(precision).items(), key=lambda kv: sum(kv[1].values()))[0]
        return f"{shown['training steps']} in {precision}; test evaluation {shown['test evaluation']}; " \
               f"export (rank 0) {shown['export']}; the peak: {peak}"

    where = " in CPU memory (deepspeed.offload: cpu)" if cfg.deepspeed.offload == "cpu" else ""
    precision = cfg.deepspeed.precision
    if precision == "auto":
        return f"model states per worker{where}: {text('fp32')} on CPU workers; {text('bf16')} on GPUs; " \
               f"activations on top"
    return f"model states per worker{where}: {text(precision)}; activations on top"


def logits_lines(plan: Plan, cfg: RunConfig) -> list[str]:
    """The causal-LM logits term of a micro-batch (train.loss_impl; trainer/chunked_loss.py): the full
    logits with their log-softmax and gradient (standard), or one chunk of them (chunked, liger)."""
    from trainer.chunked_loss import AUTO_THRESHOLD_BYTES, LOGIT_COPIES, chunk_count, logits_bytes
    from trainer.tasks.registry import TASKS

    if not TASKS[cfg.model.task].chunks_loss or not plan.vocab_size:
        return []
    # scaling.sequence_parallel: each worker computes the logits of its 1/N of the positions
    mb, length, vocab = plan.micro_batch_size, math.ceil(cfg.data.max_length / cfg.scaling.sequence_parallel), plan.vocab_size
    full = LOGIT_COPIES * logits_bytes(mb, length, vocab)
    positions = math.ceil(mb * length / chunk_count(mb, length, vocab))
    chunk = LOGIT_COPIES * logits_bytes(1, positions, vocab)
    asked = cfg.train.loss_impl
    how = (f"train.loss_impl {asked}" if asked == plan.loss_impl else
           f"train.loss_impl auto: {plan.loss_impl} on CPU workers (chunked above "
           f"{AUTO_THRESHOLD_BYTES / 2**20:.0f} MiB of logits; liger on CUDA workers where liger-kernel is installed)")
    tokens = f"{length} tokens" if cfg.scaling.sequence_parallel == 1 else \
        f"{length} tokens (data.max_length / scaling.sequence_parallel)"
    sizes = f"micro batch {mb} x {tokens} x vocab {vocab:,} x 4 bytes x {LOGIT_COPIES} (logits, log-softmax, gradient)"
    if plan.loss_impl == "standard":
        return [f"logits per worker: {full / 2**30:.2f} GiB at data.max_length ({sizes}); {how}; "
                f"chunked would hold {chunk / 2**30:.3f} GiB"]
    return [f"logits per worker: {chunk / 2**30:.3f} GiB, one chunk of {positions} positions at a time "
            f"({how}); standard would hold {full / 2**30:.2f} GiB ({sizes})"]


def describe(plan: Plan, cfg: RunConfig) -> str:
    t = cfg.train
    rows = ", ".join(f"{k} {v}" for k, v in plan.rows.items())
    return "\n".join([
        f"world size {plan.world_size} ({cfg.scaling.nodes} node(s) x {cfg.scaling.workers_per_node} worker(s)); "
        + (f"each sequence split over {cfg.scaling.sequence_parallel} consecutive workers (scaling.sequence_parallel, "
           f"Ulysses): {cfg.scaling.data_parallel_size} data-parallel rank(s); micro batch {plan.micro_batch_size} per "
           f"data-parallel rank" if cfg.scaling.sequence_parallel > 1 else f"micro batch {plan.micro_batch_size} per worker")
        + f" x accumulation {t.gradient_accumulation} = global batch {plan.global_batch_size}" + (
            f"; elastic down to {cfg.scaling.min_world_size} worker(s) (scaling.min_nodes {cfg.scaling.min_nodes}), "
            f"the accumulation recomputed to keep the global batch; growing back checked every "
            f"{cfg.scaling.resize_check_s:g} s" if cfg.scaling.is_elastic else ""),
        f"data: {rows} {'examples' if plan.data_dir else 'rows'}; {plan.steps} optimizer steps "
        f"({'train.max_steps' if t.max_steps else f'{t.epochs:g} epoch(s)'}), eval every {t.eval_every}, "
        f"checkpoint every {t.save_interval}, keep last {t.keep_last} + best",
        *(f"data format: {line}" for line in plan.reading),
        f"model: {cfg.model.name_or_path or 'inline ' + str(cfg.model.architecture.get('model_type'))}; "
        f"{plan.freezing}",
        f"deepspeed: ZeRO stage {cfg.deepspeed.zero_stage}, precision {cfg.deepspeed.precision}, "
        f"offload {cfg.deepspeed.offload}",
        memory_line(plan, cfg),
        *logits_lines(plan, cfg),
        *reference_lines(plan, cfg),
    ] + generation_lines(cfg, plan.total) \
      + [f"training mix: {Path(path).name} {n:,} rows, weight {w:g}: {share:.1%} of each epoch's draws"
         for path, w, n, share in plan.sources]
      + ([f"early stopping: validation {e.metric} ({e.mode}), patience {e.patience} evaluation(s), min_delta "
          f"{e.min_delta:g}"] if (e := t.early_stopping) else [])
      + (["test and export: the best checkpoint by validation (test.checkpoint: best)"]
         if cfg.test.checkpoint == "best" else [])
      + ([f"task: {cfg.model.task}, {len(plan.labels)} labels: {', '.join(plan.labels[:12])}"
          f"{' ...' if len(plan.labels) > 12 else ''}"] if plan.labels else []))


def reference_lines(plan: Plan, cfg: RunConfig) -> list[str]:
    """A preference objective's reference pass (trainer/reference.py): what it costs, before training."""
    from trainer.tasks.registry import TASKS, get_task

    if not TASKS[cfg.model.task].references or not get_task(cfg.model.task).needs_reference(cfg):
        return []
    pairs = sum(plan.rows.values())
    return [f"reference: before training (unless stored for these weights and data), the starting model once more "
            f"(the training setup's model-state memory, released before training) and one forward pass without "
            f"gradients over {pairs:,} pairs ({2 * pairs:,} sequences, {2 * cfg.train.micro_batch_size} per forward)"]


def generation_lines(cfg: RunConfig, total_params: int = 0) -> list[str]:
    """What eval.generate will answer (it adds to every evaluation and to the test evaluation), and,
    under ZeRO-3, how: the whole model gathered per pass, or synced per token (trainer/zero3_generation.py)."""
    g, n = cfg.eval.generate, generate_examples(cfg)
    parts = ([f"{n} validation prompts at each evaluation"] if n else []) + \
        (["every test prompt before and after fine-tuning"] if generates_test(cfg) else [])
    if not parts:
        return []
    lines = [f"generation: {' and '.join(parts)}; up to {g.max_new_tokens} new tokens, "
             f"{'sampled' if g.do_sample else 'greedy'}"]
    if cfg.deepspeed.zero_stage == 3:
        from trainer.ds_config import weight_width

        precision = cfg.deepspeed.precision
        width = weight_width(precision)
        size = f"{width * total_params / 2**30:.2f} GiB in {'fp32' if width == 4 else precision}" + \
            (" on CPU workers, half that in bf16 on GPUs" if precision == "auto" else "")
        ways = {"gathered": f"the whole model ({size}) gathered on each worker for each pass",
                "synced": "synced: every new token all-gathers every weight (no extra memory, slow)",
                "auto": f"the whole model ({size}) gathered on each worker for each pass where "
                        f"{HEADROOM:g}x that fits every worker's free memory, else synced (every new token "
                        f"all-gathers every weight: slow)"}
        lines.append(f"generation under ZeRO-3 (eval.generate.zero3: {g.zero3}): {ways[g.zero3]}")
    return lines
