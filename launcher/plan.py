"""Preflight: everything that can be checked before a worker starts, and the plan it prints.

Reads the data files and their columns, loads the tokenizer and the model's config, applies the
freezing rules to a meta-device skeleton (no weights loaded), and derives batch sizes and steps.
A failure is a ConfigError naming the key or file; nothing here starts Ray. Never imports deepspeed.
"""
from __future__ import annotations

from dataclasses import dataclass

from launcher.config import ConfigError, RunConfig


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


SAMPLE_ROWS = 200  # rows of each split prepared in preflight: bad data fails before any worker starts


def make_plan(cfg: RunConfig, cache_dir: str) -> Plan:
    from trainer.checkpoints import trainable_digest
    from trainer.data import Split, load_splits, record_kind, tokenize_split
    from trainer.freezing import describe_layout, select_trainable, summarize
    from trainer.model import build_skeleton, load_processor, prepare_pretrained
    from trainer.splits import total_steps
    from trainer.tasks import CLASSIFICATION, label_names, prepare, require_columns

    splits = load_splits(cfg)
    d, task = cfg.data, cfg.model.task
    columns = {"sequence_classification": ([d.text_column, d.label_column], ["data.text_column", "data.label_column"]),
               "token_classification": ([d.tokens_column, d.tags_column], ["data.tokens_column", "data.tags_column"]),
               "image_classification": ([d.image_column, d.label_column], ["data.image_column", "data.label_column"])}
    for split in splits:
        if not split.records:
            raise ConfigError(f"{split.source}: the {split.name} split is empty")
        if task == "causal_lm":
            record_kind(list(split.records[0].keys()), d, split.source)
        else:
            require_columns(split, *columns[task])
    labels = label_names(cfg, splits[0]) if task in CLASSIFICATION else []
    model_dir = prepare_pretrained(cfg.model, cache_dir)
    processor = load_processor(cfg.model, model_dir)
    for split in splits:
        sample = Split(split.name, split.source, split.records[:SAMPLE_ROWS])
        if task == "causal_lm":
            tokenize_split(sample, d, processor)
        else:
            prepare(cfg, sample, processor, labels)
    skeleton = build_skeleton(cfg.model, model_dir, labels)
    sizes = [(n, p.numel()) for n, p in skeleton.named_parameters()]
    layout = describe_layout(skeleton)
    trainable = select_trainable([n for n, _ in sizes], cfg.finetune, layout)
    world = cfg.scaling.world_size
    t = cfg.train
    n_train = len(splits[0].records)
    n_total, n_trainable = sum(s for _, s in sizes), sum(s for n, s in sizes if n in trainable)
    # fp32 weights of every parameter, plus Adam's two fp32 moments (and fp32 master weights in
    # bf16/fp16) of the trainable ones; ZeRO splits this across ranks but not below it.
    per_trainable = 8 + (4 if cfg.deepspeed.precision in ("bf16", "fp16") else 0)
    return Plan(
        world_size=world, micro_batch_size=t.micro_batch_size,
        global_batch_size=t.micro_batch_size * t.gradient_accumulation * world,
        rows={s.name: len(s.records) for s in splits},
        steps=total_steps(n_train, world, t.micro_batch_size, t.gradient_accumulation, t.epochs, t.max_steps),
        trainable=n_trainable, total=n_total,
        freezing=summarize(sizes, trainable, layout), model_dir=model_dir, labels=tuple(labels),
        trainable_digest=trainable_digest(trainable), checkpoint_bytes=4 * n_total + per_trainable * n_trainable)


def describe(plan: Plan, cfg: RunConfig) -> str:
    t = cfg.train
    rows = ", ".join(f"{k} {v}" for k, v in plan.rows.items())
    return "\n".join([
        f"world size {plan.world_size} ({cfg.scaling.nodes} node(s) x {cfg.scaling.workers_per_node} worker(s)); "
        f"micro batch {plan.micro_batch_size} per worker x accumulation {t.gradient_accumulation} "
        f"= global batch {plan.global_batch_size}",
        f"data: {rows} rows; {plan.steps} optimizer steps "
        f"({'train.max_steps' if t.max_steps else f'{t.epochs:g} epoch(s)'}), eval every {t.eval_every}, "
        f"checkpoint every {t.save_interval}, keep last {t.keep_last} + best",
        f"model: {cfg.model.name_or_path or 'inline ' + str(cfg.model.architecture.get('model_type'))}; "
        f"{plan.freezing}",
        f"deepspeed: ZeRO stage {cfg.deepspeed.zero_stage}, precision {cfg.deepspeed.precision}, "
        f"offload {cfg.deepspeed.offload}",
    ] + ([f"task: {cfg.model.task}, {len(plan.labels)} labels: {', '.join(plan.labels[:12])}"
          f"{' ...' if len(plan.labels) > 12 else ''}"] if plan.labels else []))
