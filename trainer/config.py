"""Typed run configuration: YAML file -> frozen dataclasses, validated at load.

Owns the config schema, its defaults (each written once, here) and every check that the config alone
can tell. Imports only the stdlib and yaml: both the launcher and the workers import it, and it must
stay cheap enough for `sft-launch --help` on any machine.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """Bad user input. The message names the file and the dotted key."""


SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


@dataclass(frozen=True)
class ModelConfig:
    # A hub id, a local directory, or "pkg:<python package>[/sub/dir]" for weights shipped in a package.
    name_or_path: Optional[str] = None
    # A GGUF file inside name_or_path; it is de-quantized once and cached as safetensors.
    gguf_file: Optional[str] = None
    # An inline architecture (a transformers config as a mapping with `model_type`) to build from scratch.
    architecture: Optional[dict] = None
    # Tokenizer location when it differs from name_or_path (required with `architecture` for text tasks).
    tokenizer: Optional[str] = None
    # Image processor location when it differs from name_or_path (required with `architecture` for images).
    image_processor: Optional[str] = None
    task: str = "causal_lm"
    # The pretrained checkpoint's own classification head is for another number of labels: replace it
    # with a fresh one (otherwise preflight refuses).
    reinit_head: bool = False
    # auto: flash_attention_2 where it is installed and the worker has a GPU, else transformers' default
    # (sdpa for models that support it).
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"] = "auto"

    def __post_init__(self) -> None:
        if (self.name_or_path is None) == (self.architecture is None):
            raise ValueError("give exactly one of model.name_or_path (pretrained weights) and "
                             "model.architecture (build from scratch)")
        from trainer.tasks.registry import TASKS  # stdlib only: cheap here

        try:
            task = TASKS[self.task]
        except KeyError:
            raise ValueError(f"model.task must be one of {', '.join(TASKS)}, got {self.task!r}") from None
        if self.architecture is not None:
            if "model_type" not in self.architecture:
                raise ValueError("model.architecture needs a 'model_type' key (e.g. gpt2, llama, bert)")
            needs = task.processor
            if getattr(self, needs) is None:
                raise ValueError(f"model.{needs} is required with model.architecture: a model built "
                                 f"from scratch has no {needs.replace('_', ' ')} of its own")
        if self.gguf_file is not None and self.name_or_path is None:
            raise ValueError("model.gguf_file needs model.name_or_path, the directory that holds it")


@dataclass(frozen=True)
class Source:
    """One training file of a mix: examples are drawn from it in proportion to `weight`."""
    SHORTHAND: typing.ClassVar[str] = "path"  # a bare string in the config is the path (weight 1)
    path: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ValueError(f"weight must be > 0, got {self.weight}")


MESSAGE_KEYS = ("role", "content", "tool_calls")  # data.message_keys
ROLES = ("system", "user", "assistant", "tool", "function_call")  # data.roles
CHAT_TEMPLATES = ("chatml", "llama3")  # data.chat_template by name (trainer/chat.py)


@dataclass(frozen=True)
class DataConfig:
    # One file, or a training mix: a list of paths, or of {path, weight} mappings (see `sources`).
    train_file: Union[str, tuple[Source, ...], None] = None
    validation_file: Optional[str] = None
    test_file: Optional[str] = None
    # A `datasets` name (hub or local script), used when no train_file is given.
    dataset: Optional[str] = None
    dataset_config: Optional[str] = None
    # causal_lm: how rows are read (trainer/conversation.py): pair (prompt/response), alpaca, messages
    # (OpenAI/HF chat) or sharegpt; auto tells them apart by their columns.
    format: Literal["auto", "pair", "alpaca", "messages", "sharegpt"] = "auto"
    prompt_column: Optional[str] = None  # default: prompt (pair), instruction (alpaca)
    response_column: Optional[str] = None  # default: response (pair), output (alpaca)
    query_column: str = "input"  # alpaca: joined to the instruction by a newline when non-empty
    history_column: str = "history"  # alpaca: earlier [instruction, output] pairs, used when present
    messages_column: Optional[str] = None  # default: messages (messages), conversations (sharegpt)
    system_column: str = "system"  # a row's system prompt, used when present
    tools_column: str = "tools"  # a row's tool definitions (a list, or a JSON string of one), used when present
    # The keys of a turn, e.g. {role: from, content: value}; default per format (messages: role, content,
    # tool_calls; sharegpt: from, value).
    message_keys: dict = field(default_factory=dict)
    # The names each role goes by in the files, e.g. {user: [human, customer], assistant: [gpt]}: they
    # replace that role's default names (trainer/conversation.py: DEFAULT_ROLE_NAMES).
    roles: dict = field(default_factory=dict)
    system_prompt: Optional[str] = None  # the system turn of rows that have none
    # A chat template for tokenizers without one, or instead of the tokenizer's: chatml, llama3, or Jinja text.
    chat_template: Optional[str] = None
    # What carries labels: every assistant turn (function calls included), only the last one, or the
    # whole conversation; train_on_eos: the end-of-turn marker after a labelled turn too.
    train_on: Literal["assistant", "last", "all"] = "assistant"
    train_on_eos: bool = True
    text_column: str = "text"
    text_pair_column: str = "text_pair"  # used when the data has this column
    label_column: str = "label"
    tokens_column: str = "tokens"
    tags_column: str = "tags"
    predicate_column: str = "predicate"  # SRL: the predicate's word index, used when the data has it
    image_column: str = "image"
    # The label set (class names or tags); default: every label of the training split, sorted.
    labels: tuple[str, ...] = ()
    # A bad row (unknown label, empty text, tag/word count mismatch, unreadable image) is skipped and
    # counted instead of stopping the run.
    skip_bad_rows: bool = False
    # How a prompt/response pair becomes text: the tokenizer's chat template, or prompt + response + eos.
    template: Literal["auto", "chat", "plain"] = "auto"
    max_length: int = 512
    # Used when only a training set is given: train / validation / test fractions of it.
    fractions: tuple[float, ...] = (0.8, 0.1, 0.1)
    split_seed: Optional[int] = None  # defaults to the run's seed
    # Where the prepared splits are kept (Arrow, memory-mapped by every worker; reused by restarts,
    # --resume and the test evaluation): default <output_dir>/data_cache. Shared storage on a cluster.
    cache_dir: Optional[str] = None
    num_proc: int = 1  # processes that prepare the data (datasets.map), on the machine that runs sft-launch
    # causal_lm: pack whole examples into rows of max_length tokens (attention stays inside each example).
    packing: bool = False

    def __post_init__(self) -> None:
        if self.train_file is None and self.dataset is None:
            raise ValueError("data needs a source: set data.train_file (jsonl/json/csv/parquet) or data.dataset")
        if self.max_length < 8:
            raise ValueError(f"data.max_length must be at least 8, got {self.max_length}")
        if self.num_proc < 1:
            raise ValueError(f"data.num_proc must be >= 1, got {self.num_proc}")
        if len(self.fractions) != 3 or any(f <= 0 for f in self.fractions) or abs(sum(self.fractions) - 1) > 1e-6:
            raise ValueError(f"data.fractions must be three positive numbers (train, validation, test) "
                             f"summing to 1, got {list(self.fractions)}")
        if (self.validation_file is None) != (self.test_file is None) and self.train_file is not None:
            raise ValueError("give both data.validation_file and data.test_file, or neither "
                             "(then data.fractions splits data.train_file)")
        for key in self.message_keys.keys() - set(MESSAGE_KEYS):
            raise ValueError(f"data.message_keys: unknown key {key!r}; a turn's keys are {', '.join(MESSAGE_KEYS)}")
        for key, name in self.message_keys.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"data.message_keys.{key} must be a key name (text), got {name!r}")
        for role, names in self.roles.items():
            if role not in ROLES:
                raise ValueError(f"data.roles: unknown role {role!r}; the roles are {', '.join(ROLES)}")
            if not (isinstance(names, str) or isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
                raise ValueError(f"data.roles.{role} must be a name or a list of names, got {names!r}")
        if self.chat_template is not None and self.chat_template not in CHAT_TEMPLATES and "{" not in self.chat_template:
            raise ValueError(f"data.chat_template must be one of {', '.join(CHAT_TEMPLATES)} or a Jinja template, "
                             f"got {self.chat_template!r}")
        if isinstance(self.train_file, tuple) and not self.train_file:
            raise ValueError("data.train_file is an empty list; give a file, or a list of files (with weights)")

    @property
    def sources(self) -> tuple[Source, ...]:
        """The training files with their weights (one of weight 1 for a single train_file; none for
        data.dataset)."""
        if self.train_file is None:
            return ()
        return (Source(self.train_file),) if isinstance(self.train_file, str) else self.train_file


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (peft) for finetune.mode: lora."""
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    # fnmatch patterns over module names; default: every linear layer inside the transformer blocks
    # (the attention and MLP projections, found by module type).
    target: tuple[str, ...] = ()
    quantize: Optional[Literal["4bit"]] = None  # QLoRA: the frozen base in 4 bits (bitsandbytes, GPUs only)

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"finetune.lora needs r >= 1, alpha > 0 and 0 <= dropout < 1, got r={self.r}, "
                             f"alpha={self.alpha}, dropout={self.dropout}")


@dataclass(frozen=True)
class FinetuneConfig:
    # global: every weight trains; local: the rules below choose; lora: low-rank adapters train (plus
    # a classification head, and whatever `train` patterns add), the base stays frozen.
    mode: Literal["global", "local", "lora"] = "global"
    # fnmatch patterns over parameter names, used when mode is "local" (with "lora": fully trained extras).
    train: tuple[str, ...] = ()
    freeze: tuple[str, ...] = ()
    train_last_layers: Optional[int] = None  # the last K transformer blocks train
    train_embeddings: Optional[bool] = None  # None: as the rules above leave them
    train_head: Optional[bool] = None  # the output head (the embeddings too when they are tied)

    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        local_keys = [k for k in ("train", "freeze", "train_last_layers", "train_embeddings", "train_head")
                      if getattr(self, k) not in (None, ())]
        if self.mode != "lora" and self.lora != LoraConfig():
            raise ValueError(f"finetune.lora is set but finetune.mode is {self.mode!r}; use finetune.mode: lora")
        if self.mode == "lora":
            extra = [k for k in local_keys if k != "train"]
            if extra:
                raise ValueError(f"finetune.{extra[0]} does not apply to finetune.mode: lora (the base is frozen, "
                                 f"adapters train); finetune.train patterns may add fully trained parameters")
            return
        if self.mode == "global" and local_keys:
            raise ValueError(f"finetune.mode is 'global' (every weight trains) but finetune.{local_keys[0]} "
                             f"is set: use finetune.mode: local for selective freezing")
        if self.mode == "local" and not local_keys:
            raise ValueError("finetune.mode is 'local' but no rule is given: set finetune.train, "
                             "finetune.freeze, finetune.train_last_layers, train_embeddings or train_head")
        if self.train_last_layers is not None and self.train_last_layers < 0:
            raise ValueError(f"finetune.train_last_layers must be >= 0, got {self.train_last_layers}")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: tuple[float, ...] = (0.9, 0.999)
    scheduler: str = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"optim.scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.warmup_steps < 0 or not 0 <= self.warmup_ratio < 1:
            raise ValueError("optim.warmup_steps must be >= 0 and optim.warmup_ratio in [0, 1)")
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("set optim.warmup_steps or optim.warmup_ratio, not both")
        if self.max_grad_norm < 0:
            raise ValueError(f"optim.max_grad_norm must be >= 0 (0 turns clipping off), got {self.max_grad_norm}")
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas must be two numbers, got {list(self.betas)}")


@dataclass(frozen=True)
class ExportConfig:
    # The dtype of final_model/'s weights; auto: the precision the run trained in.
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # finetune.mode: lora: final_model/ is the merged model; adapter/both also (adapter: only) write
    # the adapter in peft's format to final_adapter/.
    lora: Literal["merged", "adapter", "both"] = "merged"


# eval.generate.num_examples when it is not set, for tasks that generate text (causal_lm).
GENERATE_EXAMPLES = 8


ZERO3_GENERATION = ("auto", "gathered", "synced")


@dataclass(frozen=True)
class GenerateConfig:
    """Answers generated with the current weights: at every evaluation for the first validation
    prompts, and for every test prompt before and after fine-tuning."""
    # Validation prompts answered at each evaluation (TensorBoard val/generations and
    # generations/step_XXXXXXX.jsonl); None: GENERATE_EXAMPLES for tasks that generate, 0 otherwise.
    num_examples: Optional[int] = None
    # Every test prompt answered before and after fine-tuning (test_generations.jsonl, exact match and
    # ROUGE-L in test_metrics.json); None: on for tasks that generate.
    test: Optional[bool] = None
    max_new_tokens: int = 128
    do_sample: bool = False  # False: greedy decoding
    # ZeRO-3 only (trainer/zero3_generation.py): "gathered" lifts ZeRO-3's hooks and generates on the
    # whole model (once more in memory per worker, for the pass); "synced" all-gathers every weight for
    # every new token (no extra memory, slow); "auto": gathered where it fits every worker's free memory.
    zero3: str = "auto"

    def __post_init__(self) -> None:
        if self.zero3 not in ZERO3_GENERATION:
            raise ValueError(f"eval.generate.zero3 must be one of {', '.join(ZERO3_GENERATION)}, got {self.zero3!r}")
        if self.num_examples is not None and self.num_examples < 0:
            raise ValueError(f"eval.generate.num_examples must be >= 0 (0 turns it off), got {self.num_examples}")
        if self.max_new_tokens < 1:
            raise ValueError(f"eval.generate.max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class EvalConfig:
    generate: GenerateConfig = field(default_factory=GenerateConfig)


@dataclass(frozen=True)
class EarlyStoppingConfig:
    """Stop when the validation metric has not improved for `patience` evaluations in a row."""
    metric: str = "loss"  # one the task reports at validation (loss always)
    mode: Literal["min", "max"] = "min"  # min: lower is better (loss, perplexity); max: accuracy, f1
    patience: int = 3  # evaluations without improvement (counted in evaluations, not steps)
    min_delta: float = 0.0  # an improvement is a change by more than this

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise ValueError(f"train.early_stopping.patience must be >= 1, got {self.patience}")
        if self.min_delta < 0:
            raise ValueError(f"train.early_stopping.min_delta must be >= 0, got {self.min_delta}")


@dataclass(frozen=True)
class TrainConfig:
    epochs: float = 1.0
    max_steps: Optional[int] = None  # optimizer steps; overrides epochs
    micro_batch_size: int = 4  # per worker, per forward/backward pass
    gradient_accumulation: int = 1
    eval_every: int = 50  # optimizer steps
    save_every: Optional[int] = None  # optimizer steps; defaults to eval_every
    keep_last: int = 2
    log_every: int = 10
    # Activation checkpointing on the model's blocks (recompute in backward; use_reentrant=False).
    gradient_checkpointing: bool = False
    # Worker-group restarts (from the latest checkpoint) after a worker process dies.
    max_failures: int = 3
    # After SIGTERM/SIGUSR1/Ctrl-C: seconds the workers get to finish the step and checkpoint.
    stop_grace_s: float = 300.0
    # Stop when validation stops improving (None: train the whole schedule).
    early_stopping: Optional[EarlyStoppingConfig] = None

    def __post_init__(self) -> None:
        if self.max_failures < 0 or self.stop_grace_s <= 0:
            raise ValueError("train.max_failures must be >= 0 and train.stop_grace_s > 0")
        for key in ("micro_batch_size", "gradient_accumulation", "eval_every", "keep_last", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"train.max_steps must be >= 1, got {self.max_steps}")
        if self.epochs <= 0:
            raise ValueError(f"train.epochs must be > 0, got {self.epochs}")
        if self.save_every is not None and self.save_every < 1:
            raise ValueError(f"train.save_every must be >= 1, got {self.save_every}")

    @property
    def save_interval(self) -> int:
        return self.save_every if self.save_every is not None else self.eval_every


@dataclass(frozen=True)
class DeepSpeedConfig:
    zero_stage: int = 2
    offload: Literal["none", "cpu"] = "none"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # A DeepSpeed JSON file passed through; batch sizes and the optimizer still come from this config.
    config_file: Optional[str] = None

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.offload == "cpu" and self.zero_stage == 0:
            raise ValueError("deepspeed.offload: cpu needs deepspeed.zero_stage 1, 2 or 3")


@dataclass(frozen=True)
class ScalingConfig:
    nodes: int = 1
    workers_per_node: int = 2
    cpus_per_worker: int = 1
    gpus_per_worker: Optional[float] = None  # None: 1 where the cluster has GPUs, else 0

    def __post_init__(self) -> None:
        for key in ("nodes", "workers_per_node", "cpus_per_worker"):
            if getattr(self, key) < 1:
                raise ValueError(f"scaling.{key} must be >= 1, got {getattr(self, key)}")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise ValueError(f"scaling.gpus_per_worker must be >= 0, got {self.gpus_per_worker}")

    @property
    def world_size(self) -> int:
        return self.nodes * self.workers_per_node


@dataclass(frozen=True)
class SlurmConfig:
    """What `sft-launch --slurm` writes into the batch script (nodes come from scaling.nodes)."""
    partition: Optional[str] = None
    account: Optional[str] = None
    time: str = "01:00:00"
    job_name: Optional[str] = None  # default: sft-<config name>
    cpus_per_node: Optional[int] = None  # default: workers_per_node x cpus_per_worker
    gpus_per_node: Optional[int] = None  # default: workers_per_node x gpus_per_worker (0 without GPUs)
    signal_grace_s: int = 120  # USR1 this long before the time limit or a preemption
    log: Optional[str] = None  # default: <output_dir>/slurm-%j.out
    setup: str = ""  # shell lines run first on the first node (module load ..., source venv)

    def __post_init__(self) -> None:
        if self.signal_grace_s < 10:
            raise ValueError(f"slurm.signal_grace_s must be >= 10, got {self.signal_grace_s}")
        for key in ("cpus_per_node", "gpus_per_node"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise ValueError(f"slurm.{key} must be >= 0, got {getattr(self, key)}")


@dataclass(frozen=True)
class TuneConfig:
    """`sft-launch CONFIG --tune`: Ray Tune trials over `space`, each a full run (see launcher/tune.py).
    The space itself (its distributions, the values they give) is checked by launcher/search_space.py."""
    metric: str = "loss"  # a validation metric the task reports
    mode: Literal["min", "max"] = "min"
    num_samples: int = 8  # trials; with grid values: repeats of the grid
    max_concurrent_trials: Optional[int] = None  # default: as many as the cluster holds at once
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = 1  # evaluations before ASHA may stop a trial
    reduction_factor: int = 2
    search_alg: Literal["random", "optuna"] = "random"
    space: dict = field(default_factory=dict)  # config key -> {uniform|loguniform|randint|choice|grid: ...}

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.grace_period < 1 or self.reduction_factor < 2:
            raise ValueError("tune.num_samples and tune.grace_period must be >= 1, tune.reduction_factor >= 2")
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            raise ValueError(f"tune.max_concurrent_trials must be >= 1, got {self.max_concurrent_trials}")


@dataclass(frozen=True)
class FinalEvalConfig:
    """The test evaluation after training (the `test:` section)."""
    # final: the last checkpoint; best: the best by validation (train.early_stopping.metric and mode
    # when set, else validation loss), which retention keeps. The export uses the same one.
    checkpoint: Literal["final", "best"] = "final"


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    data: DataConfig
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    test: FinalEvalConfig = field(default_factory=FinalEvalConfig)
    tune: Optional[TuneConfig] = None  # the search `sft-launch --tune` runs
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: Optional[str] = None  # default (set by the CLI): runs/<config file name>
    seed: int = 42

    def __post_init__(self) -> None:
        from trainer.tasks.registry import TASKS  # stdlib only: cheap here

        if self.data.packing and not TASKS[self.model.task].packs:
            raise ValueError(f"data.packing is set, but model.task {self.model.task!r} has no packing "
                             f"(only tasks that train on token sequences pack examples into rows)")
        stopping = self.train.early_stopping
        if stopping is not None and stopping.metric not in TASKS[self.model.task].metrics:
            raise ValueError(f"train.early_stopping.metric is {stopping.metric!r}, but model.task "
                             f"{self.model.task!r} reports {', '.join(TASKS[self.model.task].metrics)} at validation")

        if self.test.checkpoint == "best" and self.train.eval_every % self.train.save_interval:
            raise ValueError(f"test.checkpoint: best tests the best evaluated checkpoint, so every evaluation must "
                             f"write one: train.eval_every ({self.train.eval_every}) must be a multiple of "
                             f"train.save_every ({self.train.save_interval})")
        if self.tune is not None:
            metrics = TASKS[self.model.task].metrics
            if self.tune.metric not in metrics:
                raise ValueError(f"tune.metric is {self.tune.metric!r}, but model.task {self.model.task!r} reports "
                                 f"{', '.join(metrics)} at validation")
        g = self.eval.generate
        if not TASKS[self.model.task].generates and (g.num_examples or g.test):
            key, value = ("num_examples", g.num_examples) if g.num_examples else ("test", "true")
            raise ValueError(f"eval.generate.{key} is {value}, but model.task {self.model.task!r} does not "
                             f"generate text (only causal_lm does); remove it or set it to 0 / false")

    @property
    def generate_examples(self) -> int:
        """Validation prompts answered at each evaluation (eval.generate.num_examples or the task's default)."""
        n = self.eval.generate.num_examples
        return n if n is not None else (GENERATE_EXAMPLES if self._generates else 0)

    @property
    def generates_test(self) -> bool:
        """Whether every test prompt is answered before and after fine-tuning."""
        test = self.eval.generate.test
        return test if test is not None else self._generates

    @property
    def _generates(self) -> bool:
        from trainer.tasks.registry import TASKS

        return TASKS[self.model.task].generates

    @property
    def split_seed(self) -> int:
        return self.seed if self.data.split_seed is None else self.data.split_seed


# ---------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        shorthand = getattr(tp, "SHORTHAND", None)
        keys = ", ".join(f.name for f in dataclasses.fields(tp))
        return f"a {shorthand} or a mapping {{{keys}}}" if shorthand else f"a mapping {{{keys}}}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false", dict: "a mapping"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check one scalar/list value against its annotation; lists become tuples."""
    origin = typing.get_origin(tp)
    wrong = ConfigError(f"{where}: {key} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        listed = [a for a in args if typing.get_origin(a) is tuple]
        if isinstance(value, (list, tuple)) and listed:  # its items' own errors say more than "wrong"
            return _coerce(value, listed[0], key, where)
        for arg in args:
            try:
                return _coerce(value, arg, key, where)
            except ConfigError:
                pass
        raise wrong
    if dataclasses.is_dataclass(tp):
        shorthand = getattr(tp, "SHORTHAND", None)
        if shorthand and isinstance(value, str):
            value = {shorthand: value}
        if not isinstance(value, dict):
            raise wrong
        return _build(tp, value, where, f"{key}.", name=key)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise wrong
    if origin is tuple:
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise wrong
        return tuple(_coerce(v, typing.get_args(tp)[0], f"{key}[{i}]", where) for i, v in enumerate(value))
    if tp is type(None):
        if value is None:
            return None
        raise wrong
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise wrong
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise wrong
    if tp is str:
        if isinstance(value, str):
            return value
        raise wrong
    if tp is dict:
        if isinstance(value, dict):
            return value
        raise wrong
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def _optional_dataclass(tp: Any) -> Optional[type]:
    """X for an `Optional[X]` annotation whose X is a config dataclass (an optional section)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1 and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def _build(cls: type, raw: Any, where: str, prefix: str = "", name: str = "") -> Any:
    """`name`: the key of a dataclass inside a list (data.train_file[1]), for its own checks' errors."""
    if not isinstance(raw, dict):
        name = prefix.rstrip(".") or "the top level"
        raise ConfigError(f"{where}: {name} must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in sorted(raw.keys() - set(names), key=str):
        close = difflib.get_close_matches(str(key), names, n=1)
        hint = f" Did you mean '{prefix}{close[0]}'?" if close else f" Known keys: {', '.join(names)}."
        raise ConfigError(f"{where}: unknown key '{prefix}{key}'.{hint}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}: missing required section '{prefix}{f.name}'")
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, raw[f.name] if raw[f.name] is not None else {}, where,
                                    f"{prefix}{f.name}.")
        elif _optional_dataclass(tp) is not None:  # an optional section: null (or absent) turns it off
            kwargs[f.name] = None if raw[f.name] is None else _build(_optional_dataclass(tp), raw[f.name], where,
                                                                     f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _coerce(raw[f.name], tp, prefix + f.name, where)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{where}: {name + ': ' if name else ''}{err}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """`optim.lr=3e-5` -> (["optim", "lr"], 3e-5); the value is typed like YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set optim.lr=3e-5")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = dict(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[path[-1]] = value
    return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's last-one-wins would hide a key written twice (often a typo'd section): refuse it."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice (first at line {seen[key] + 1}); YAML would keep only "
                                f"the last one", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file ({err.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the config file is not UTF-8 text") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: YAML syntax error{at}: {problem}") from None
    if raw is None:
        raise ConfigError(f"{path}: the config file is empty")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping of sections (model, data, ...), "
                          f"got {type(raw).__name__}")
    return raw


def from_dict(raw: dict, where: str = "<config>") -> RunConfig:
    return _build(RunConfig, raw, where)


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML file, apply `--set key=value` overrides, validate, and resolve relative paths.

    Relative data, model and tokenizer paths are taken relative to the config file when they exist
    there, so a config works from any working directory; output_dir stays relative to the caller.
    """
    path = Path(path)
    raw = apply_overrides(read_yaml(path), list(overrides))
    cfg = from_dict(raw, str(path))
    return resolve_paths(cfg, path.parent)


def _resolve(value: Optional[str], base: Path) -> Optional[str]:
    if value is None or value.startswith("pkg:") or Path(value).is_absolute():
        return value
    candidate = base / value
    return str(candidate.resolve()) if candidate.exists() else value


def resolve_paths(cfg: RunConfig, base: Path) -> RunConfig:
    train = cfg.data.train_file
    train = _resolve(train, base) if not isinstance(train, tuple) else \
        tuple(dataclasses.replace(s, path=_resolve(s.path, base)) for s in train)
    data = dataclasses.replace(cfg.data, train_file=train, **{k: _resolve(getattr(cfg.data, k), base)
                                                              for k in ("validation_file", "test_file")})
    model = dataclasses.replace(cfg.model, name_or_path=_resolve(cfg.model.name_or_path, base),
                                tokenizer=_resolve(cfg.model.tokenizer, base),
                                image_processor=_resolve(cfg.model.image_processor, base))
    ds = dataclasses.replace(cfg.deepspeed, config_file=_resolve(cfg.deepspeed.config_file, base))
    return dataclasses.replace(cfg, data=data, model=model, deepspeed=ds)


def to_dict(cfg: RunConfig) -> dict:
    """Plain dict (lists, not tuples) that `from_dict` reads back into an equal config."""
    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(dataclasses.asdict(cfg))
