"""The task interface and the registry: `model.task` names one module of trainer/tasks/.

What a task *is* (its model head, its processor, whether it packs or generates, the metrics it
reports) is data: one `TaskSpec` per task in `TASKS`, read by the config checks, preflight and the
loop without importing the task's code. What a task *does* (what it reads, how it prepares a split,
how batches are collated, how it is evaluated) is its module, which implements `Task` with plain
module-level functions (no classes to inherit from). Everything else (the loop, DeepSpeed,
checkpoints, the controller) is shared and never compares the task name. Adding a task: copy
trainer/tasks/sequence_classification.py, change it, and add one line to TASKS. Imports only the
stdlib; task modules import torch and transformers inside their functions, so looking a task up
stays cheap.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional, Protocol

if TYPE_CHECKING:
    from trainer.config import DataConfig, RunConfig
    from trainer.data import Split
    from trainer.evaluation import Shard
    from trainer.data import Prepared
    from trainer.chunked_loss import LossImpl

@dataclass(frozen=True)
class TaskSpec:
    """What a task is, readable without importing its module (the config checks read it at load)."""
    module: str  # the module that implements Task
    auto_model: str  # the transformers Auto class of the model with this task's head
    processor: Literal["tokenizer", "image_processor"]  # what turns a row into inputs (model.<processor>)
    unit: Literal["tokens", "samples"]  # what train/<unit>_per_s counts
    metrics: tuple[str, ...]  # the scalar metrics evaluate() reports (train.early_stopping.metric is one)
    packs: bool = False  # data.packing applies; then the module also has pack(prepared, cfg, scratch) -> Prepared
    # It answers prompts (eval.generate); then the module also has generate(shard, prepared, processor,
    # count, settings) -> [{"id", "prompt", "reference", "answer"}] (trainer/tasks/causal_lm.py).
    generates: bool = False
    # train.loss_impl chunked / liger apply: the module's loss and evaluate compute the logits from
    # the model's last hidden states a slice at a time (trainer/chunked_loss.py).
    chunks_loss: bool = False
    # scaling.sequence_parallel applies: the module's loss takes a sequence-parallel shard (input_ids,
    # position_ids, pre-shifted shift_labels and the sequence's num_items_in_batch; trainer/sequence_parallel.py).
    splits_sequences: bool = False
    # The objective may compare with the starting model's per-example log-probabilities, computed once
    # before training (trainer/reference.py); then the module also has needs_reference(cfg) -> bool
    # and reference_logps(shard, prepared) -> [(chosen, rejected)] by position.
    references: bool = False
    # The config section that holds this task's own settings (RunConfig.<section>); other tasks refuse it.
    section: Optional[str] = None


# model.task -> what the task is and the module that implements it.
TASKS = {
    "causal_lm": TaskSpec("trainer.tasks.causal_lm", "AutoModelForCausalLM", "tokenizer", "tokens",
                          ("loss", "perplexity", "token_accuracy"), packs=True, generates=True,
                          chunks_loss=True, splits_sequences=True),
    "sequence_classification": TaskSpec("trainer.tasks.sequence_classification", "AutoModelForSequenceClassification",
                                        "tokenizer", "tokens", ("loss", "accuracy", "macro_f1")),
    "token_classification": TaskSpec("trainer.tasks.token_classification", "AutoModelForTokenClassification",
                                     "tokenizer", "tokens", ("loss", "precision", "recall", "f1", "token_accuracy")),
    "preference": TaskSpec("trainer.tasks.preference", "AutoModelForCausalLM", "tokenizer", "tokens",
                           ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                            "logps/chosen", "logps/rejected"), generates=True, references=True,
                           section="preference"),
    "image_classification": TaskSpec("trainer.tasks.image_classification", "AutoModelForImageClassification",
                                     "image_processor", "samples", ("loss", "accuracy", "macro_f1")),
}


class Task(Protocol):
    """The functions of a task's module; what the task is (its TaskSpec) lives in TASKS."""

    def check_columns(self, split: Split, d: DataConfig) -> Optional[str]:
        """A ConfigError naming the data.*_column key when a column the task reads is missing; else
        what the startup summary says of how the split is read (None: nothing to say)."""

    def label_names(self, cfg: RunConfig, train: Split) -> list[str]:
        """The label set (empty for tasks without labels)."""

    def prepare(self, split: Split, cfg: RunConfig, processor: Any, labels: list[str],
                scratch: Optional[Path] = None) -> Prepared:
        """Model inputs of every usable row (an Arrow table, written under `scratch` or kept in
        memory); bad rows raise a ConfigError or are counted as dropped."""

    def collator(self, processor: Any) -> Callable[[list[dict]], dict]:
        """Pads a list of prepared examples into a batch of tensors."""

    def count(self, examples: list[dict]) -> int:
        """How many units (TaskSpec.unit) a micro-batch's examples hold (real tokens, not padding; or samples)."""

    def loss(self, model: Any, batch: dict, impl: LossImpl, cfg: RunConfig) -> Any:
        """The training objective of one micro-batch, a scalar tensor the engine backpropagates.
        `model`: the DeepSpeed engine (its forward is the model's; its `module` the model itself,
        whose submodules, the LM head say, can be called on their own, also under ZeRO-3); `batch`:
        the collator's output on the device, extra per-example columns included (the model's forward
        takes only its own: pop the others); `impl`: train.loss_impl as resolved for this run
        (trainer/chunked_loss.py; only tasks with TaskSpec.chunks_loss see other than standard);
        `cfg`: the run's config (an objective's own settings, e.g. the preference: section).
        Most tasks: common.model_loss, the model's own loss."""

    def evaluate(self, shard: Shard, prepared: Prepared, labels: list[str]) -> tuple[dict, list[dict]]:
        """Metrics over the whole split (each example once across ranks) and per-example rows for
        test_predictions.jsonl (empty when the task has none). `shard.model` is the engine, for a
        task whose evaluation is not a function of the logits (shard.forward); `shard.config` the run's config."""


def get_task(name: str) -> Task:
    """The module of a task (imports it; TASKS[name] alone says what the task is)."""
    if name not in TASKS:
        raise KeyError(name)
    return importlib.import_module(TASKS[name].module)  # a module implements the Protocol
