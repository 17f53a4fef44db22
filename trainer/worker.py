"""What every rank builds before it trains or tests, and its passes over a split.

`setup` builds the model (partitioned under ZeRO-3), applies the freezing rules or LoRA, loads the
prepared data and makes the DeepSpeed engine (trainer/engine.py), ready to load a checkpoint of any
world size (trainer/checkpoints.py universal_copy); identical on every rank. `evaluate_split` and
`generate_split` run the engine's current weights over a split, under ZeRO-3 on the whole model
gathered once for all the passes inside `one_pass`. trainer/loop.py calls these; never imports ray.
"""
from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Optional

from trainer import checkpoints, data_cache, reference, sequence_parallel
from trainer.chunked_loss import loss_implementation
from trainer.config import RunConfig
from trainer.data import Prepared
from trainer.ds_config import deepspeed_config, resolve_precision
from trainer.engine import build_engine, init_distributed, partitioned_build
from trainer.evaluation import Shard, generator
from trainer.jobs import WorkerArgs
from trainer.lora import trainable_model
from trainer.model import build_model, load_processor, model_config, prepare_pretrained
from trainer.report import Reporter
from trainer.schedule import steps_of_run
from trainer.tasks.registry import TASKS, Task, get_task
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
    # scaling.sequence_parallel: this rank's sequence-parallel group and data-parallel rank (trainer/sequence_parallel.py)
    parallel: sequence_parallel.Layout
    # () -> a context around an evaluation or generation pass: under ZeRO-3 the whole model gathered
    # for it, or synced (trainer/zero3_generation.py); other stages hold the whole model already.
    whole_model: Callable[[], ContextManager[GenerationWeights]]
    generation: Optional[GenerationWeights] = None  # how the last generation pass ran
    passing: Optional[GenerationWeights] = None  # the pass in progress (see one_pass)


def setup(cfg: RunConfig, args: WorkerArgs, splits: tuple[str, ...], reporter: Reporter,
          checkpoint: Optional[str] = None, with_reference: bool = True,
          reference_folder: Optional[Path] = None) -> Setup:
    """Model, freezing, data and DeepSpeed engine, identical on every rank; the engine ready to load
    `checkpoint` (of another world size too: checkpoints.universal_copy). A task whose objective
    reads the starting model's log-probabilities gets them as columns of its splits (computed before
    by trainer/reference.py, whose ensure() says where: `reference_folder`; `with_reference=False`: the
    pass that computes them)."""
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    init_distributed()
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
    if with_reference and TASKS[cfg.model.task].references and task.needs_reference(cfg):
        folder = reference_folder or reference.folder_for(cfg, reference.root_for(args), model_dir, precision, processor)
        if not reference.is_complete(folder):
            raise RuntimeError(f"no reference log-probabilities in {folder}: trainer/reference.py ensure() "
                               f"computes them before training")
        data = {name: reference.attach(p, folder, name) for name, p in data.items()}
    model_id = checkpoints.model_identity(cfg.model)
    universal = checkpoint is not None and checkpoints.universal_copy(
        Path(checkpoint), model_id, world, rank, reporter.log if rank == 0 else (lambda text: None))
    # Batch sizes and steps count data-parallel ranks: a sequence-parallel group reads one micro-batch.
    parallel = sequence_parallel.layout(rank, world, cfg.scaling.sequence_parallel)
    ds_config = deepspeed_config(cfg, parallel.dp_world, precision, load_universal=universal,
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

    steps = steps_of_run(cfg, len(prepared.splits["train"]), parallel.dp_world)  # elastic: at its starting size
    if parallel.on:  # Ulysses' attention for training, once per process (the test phase reuses it)
        parallel = replace(parallel, mpu=sequence_parallel.register(model, parallel.size, cfg.train.micro_batch_size))
    engine = build_engine(cfg, model, ds_config, steps, parallel.mpu)  # after freezing: ZeRO holds only what it is given
    # Which causal-LM objective (train.loss_impl); evaluation follows it (trainer/chunked_loss.py).
    loss_impl = loss_implementation(cfg, model.config, on_gpu, importlib.util.find_spec("liger_kernel") is not None)
    if rank == 0 and loss_impl.name != "standard":
        reporter.log(f"loss: {loss_impl.name} (train.loss_impl: {cfg.train.loss_impl}), the logits in "
                     f"{loss_impl.chunks} chunk(s) per micro-batch")
    shard = Shard(lambda batch: engine(**batch).logits, task.collator(processor), rank, world,
                  cfg.train.micro_batch_size, device, model=engine, loss_impl=loss_impl, config=cfg)
    whole_model = partial(generation_weights, engine, cfg.eval.generate.zero3, cfg.deepspeed.zero_stage, world, device)
    return Setup(task, engine, processor, shard, data, labels, steps, rank, world,
                 model_id, checkpoints.trainable_digest(trainable), precision, parallel, whole_model)


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
