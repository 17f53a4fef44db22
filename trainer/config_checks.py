"""The config checks that need to know what the task is, and the defaults that depend on it.

What a task is (its processor, whether it packs or generates, the metrics it reports) is data in
trainer/tasks/registry.py's TASKS table; this module reads that table, never a task module. The
loader (trainer/config_load.py: from_dict) runs `check` on every config it builds, after the
schema's own checks (trainer/config.py), so a config that names a task cannot ask what the task
lacks. Imports the stdlib, the schema and the registry only.
"""
from __future__ import annotations

from trainer.config import RunConfig
from trainer.tasks.registry import TASKS

# eval.generate.num_examples when it is not set, for tasks that generate text (causal_lm).
GENERATE_EXAMPLES = 8


def check(cfg: RunConfig) -> None:
    """A ValueError naming the dotted key when the config asks of its task what the task cannot do
    (the loader adds the file)."""
    m = cfg.model
    task = TASKS.get(m.task)
    if task is None:
        raise ValueError(f"model.task must be one of {', '.join(TASKS)}, got {m.task!r}")
    needs = task.processor
    if m.architecture is not None and getattr(m, needs) is None:
        raise ValueError(f"model.{needs} is required with model.architecture: a model built "
                         f"from scratch has no {needs.replace('_', ' ')} of its own")
    if cfg.data.packing and not task.packs:
        raise ValueError(f"data.packing is set, but model.task {m.task!r} has no packing "
                         f"(only tasks that train on token sequences pack examples into rows)")
    impl = cfg.train.loss_impl
    if impl in ("chunked", "liger") and not task.chunks_loss:
        raise ValueError(f"train.loss_impl is {impl!r}, but model.task {m.task!r} computes its loss from "
                         f"its own head (only causal_lm has a chunked loss); use auto or standard")
    if impl == "liger" and cfg.deepspeed.zero_stage == 3:
        raise ValueError("train.loss_impl: liger uses the LM head weight outside the head's forward, which "
                         "is not verified under deepspeed.zero_stage 3; use chunked (it gathers the weight "
                         "through the head module itself) or ZeRO stage 0-2")
    check_sequence_parallel(cfg, task)
    stopping = cfg.train.early_stopping
    if stopping is not None and stopping.metric not in task.metrics:
        raise ValueError(f"train.early_stopping.metric is {stopping.metric!r}, but model.task "
                         f"{m.task!r} reports {', '.join(task.metrics)} at validation")
    if cfg.tune is not None and cfg.tune.metric not in task.metrics:
        raise ValueError(f"tune.metric is {cfg.tune.metric!r}, but model.task {m.task!r} reports "
                         f"{', '.join(task.metrics)} at validation")
    check_task_section(cfg, task)
    g = cfg.eval.generate
    if not task.generates and (g.num_examples or g.test):
        key, value = ("num_examples", g.num_examples) if g.num_examples else ("test", "true")
        raise ValueError(f"eval.generate.{key} is {value}, but model.task {m.task!r} does not "
                         f"generate text (only causal_lm does); remove it or set it to 0 / false")


def check_sequence_parallel(cfg: RunConfig, task) -> None:
    """What DeepSpeed's Ulysses (scaling.sequence_parallel > 1) cannot do, or sft has not verified with
    it, refused by key (trainer/sequence_parallel.py; the heads are checked in preflight, on the model)."""
    n = cfg.scaling.sequence_parallel
    if n == 1:
        return
    refusals = [
        (not task.splits_sequences, f"model.task {cfg.model.task!r} has no sequence-parallel objective (only causal_lm)"),
        (cfg.deepspeed.zero_stage == 0, "deepspeed.zero_stage 0 is not supported by DeepSpeed's sequence "
                                        "parallelism; use ZeRO stage 1, 2 or 3"),
        (cfg.data.packing, "data.packing needs a varlen attention to keep packed examples apart, and Ulysses "
                           "drops the attention mask; set data.packing: false"),
        (cfg.model.attn_implementation == "eager", "model.attn_implementation eager needs a full attention mask, "
                                                   "which Ulysses drops; use sdpa, flash_attention_2 or auto"),
        (cfg.train.loss_impl == "liger", "train.loss_impl liger is not verified with sequence parallelism (its "
                                         "loss over a shard is not tested on a GPU yet); use chunked or auto"),
    ]
    for refused, why in refusals:
        if refused:
            raise ValueError(f"scaling.sequence_parallel is {n}, but {why}")


def check_task_section(cfg: RunConfig, task) -> None:
    """A task's own section (TaskSpec.section) is set only for that task."""
    for section in {spec.section for spec in TASKS.values() if spec.section} - {task.section}:
        if getattr(cfg, section) != type(getattr(cfg, section))():
            owner = next(name for name, spec in TASKS.items() if spec.section == section)
            raise ValueError(f"the {section} section is set, but model.task is {cfg.model.task!r}; "
                             f"use model.task: {owner} (or remove the section)")


def generate_examples(cfg: RunConfig) -> int:
    """Validation prompts answered at each evaluation (eval.generate.num_examples or the task's default)."""
    n = cfg.eval.generate.num_examples
    return n if n is not None else (GENERATE_EXAMPLES if TASKS[cfg.model.task].generates else 0)


def generates_test(cfg: RunConfig) -> bool:
    """Whether every test prompt is answered before and after fine-tuning."""
    test = cfg.eval.generate.test
    return test if test is not None else TASKS[cfg.model.task].generates
