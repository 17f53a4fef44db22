"""The run configuration's schema: frozen dataclasses, their defaults (each written once, here),
ConfigError, and the checks each section can make of its own fields.

The words the launcher and the workers share, so it sits at the bottom: imports only the stdlib,
never task code (what a task is lives in trainer/tasks/registry.py, and the checks that need it in
trainer/config_checks.py), and builds nothing but the config. Reading YAML into it:
trainer/config_load.py. The search space of tune: launcher/search_space.py.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal, Optional, Union


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
        # model.task, and the processor a model built from scratch needs: trainer/config_checks.py.
        if (self.name_or_path is None) == (self.architecture is None):
            raise ValueError("give exactly one of model.name_or_path (pretrained weights) and "
                             "model.architecture (build from scratch)")
        if self.architecture is not None and "model_type" not in self.architecture:
            raise ValueError("model.architecture needs a 'model_type' key (e.g. gpt2, llama, bert)")
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


ZERO3_GENERATION = ("auto", "gathered", "synced")


@dataclass(frozen=True)
class GenerateConfig:
    """Answers generated with the current weights: at every evaluation for the first validation
    prompts, and for every test prompt before and after fine-tuning."""
    # Validation prompts answered at each evaluation (TensorBoard val/generations and
    # generations/step_XXXXXXX.jsonl); None: config_checks.GENERATE_EXAMPLES for tasks that generate, 0 otherwise.
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
    # The causal-LM objective (trainer/chunked_loss.py): standard (the model's own, full logits),
    # chunked (LM head + cross-entropy over slices, gradients made in forward; any device), liger
    # (liger-kernel's fused linear cross-entropy; CUDA), auto (liger on CUDA when installed, else
    # chunked when micro_batch_size x data.max_length x vocab x 4 bytes > 256 MiB, else standard).
    loss_impl: Literal["auto", "standard", "chunked", "liger"] = "auto"
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
    # Elastic continuation: fewer nodes than `nodes` the run may go on with after losing some (None:
    # `nodes`, no elasticity). Ray Train resizes the group by worker count, within
    # min_nodes x workers_per_node .. nodes x workers_per_node, from the latest checkpoint.
    min_nodes: Optional[int] = None
    resize_check_s: float = 60.0  # how often Ray looks for returned or new nodes to grow back onto
    # Ulysses sequence parallelism (trainer/sequence_parallel.py): each training sequence split over
    # this many consecutive workers; batches, steps and data positions count world / N data-parallel ranks.
    sequence_parallel: int = 1

    def __post_init__(self) -> None:
        for key in ("nodes", "workers_per_node", "cpus_per_worker"):
            if getattr(self, key) < 1:
                raise ValueError(f"scaling.{key} must be >= 1, got {getattr(self, key)}")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise ValueError(f"scaling.gpus_per_worker must be >= 0, got {self.gpus_per_worker}")
        if self.min_nodes is not None and not 1 <= self.min_nodes <= self.nodes:
            raise ValueError(f"scaling.min_nodes must be between 1 and scaling.nodes ({self.nodes}), got "
                             f"{self.min_nodes}")
        if self.resize_check_s <= 0:
            raise ValueError(f"scaling.resize_check_s must be > 0, got {self.resize_check_s:g}")
        if self.sequence_parallel < 1:
            raise ValueError(f"scaling.sequence_parallel must be >= 1, got {self.sequence_parallel}")
        if self.world_size % self.sequence_parallel:
            raise ValueError(f"scaling.sequence_parallel = {self.sequence_parallel} must divide the worker count "
                             f"({self.nodes} scaling.nodes x {self.workers_per_node} scaling.workers_per_node = "
                             f"{self.world_size}): each sequence is split over that many workers")
        if self.sequence_parallel > 1 and self.is_elastic:
            raise ValueError("scaling.sequence_parallel with scaling.min_nodes (elastic continuation) is not "
                             "supported: a resize would break the sequence-parallel groups; remove one of them")

    @property
    def world_size(self) -> int:
        """The worker count the run starts with (and the most it grows back to)."""
        return self.nodes * self.workers_per_node

    @property
    def min_world_size(self) -> int:
        """The fewest workers the run goes on with (scaling.min_nodes x workers_per_node)."""
        return (self.min_nodes if self.min_nodes is not None else self.nodes) * self.workers_per_node

    @property
    def is_elastic(self) -> bool:
        return self.min_world_size < self.world_size

    @property
    def data_parallel_size(self) -> int:
        """Data-parallel ranks at the starting size: the workers over scaling.sequence_parallel."""
        return self.world_size // self.sequence_parallel


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


TRACKERS = ("tensorboard", "mlflow", "wandb")  # tracking.report_to (launcher/tracking*.py)


@dataclass(frozen=True)
class MlflowConfig:
    """MLflow (tracking.report_to: [mlflow]). Each unset key falls back to MLflow's own environment
    variable, then to the embedded default."""
    # MLFLOW_TRACKING_URI, else a SQLite store in the output directory (sqlite:///<output_dir>/mlflow.db,
    # the artifacts beside it in mlflow-artifacts/).
    tracking_uri: Optional[str] = None
    experiment: Optional[str] = None  # MLFLOW_EXPERIMENT_NAME, else "sft"
    run_name: Optional[str] = None  # default: the output directory's name
    tags: dict = field(default_factory=dict)  # extra run tags


@dataclass(frozen=True)
class WandbConfig:
    """Weights & Biases (tracking.report_to: [wandb]); unset keys fall back to WANDB_* variables."""
    project: Optional[str] = None  # WANDB_PROJECT, else "sft"
    entity: Optional[str] = None  # WANDB_ENTITY, else the account's default
    name: Optional[str] = None  # default: the output directory's name
    tags: tuple[str, ...] = ()
    mode: Optional[Literal["online", "offline"]] = None  # WANDB_MODE, else online (offline: `wandb sync` later)


@dataclass(frozen=True)
class TrackingConfig:
    """Where a run's metrics, parameters and files go besides its output directory."""
    # Any of tensorboard, mlflow, wandb; "none" (or []) turns tracking off.
    report_to: Union[str, tuple[str, ...]] = ("tensorboard",)
    log_model: bool = False  # also upload final_model/ as an artifact (it can be large)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        chosen = (self.report_to,) if isinstance(self.report_to, str) else tuple(self.report_to)
        chosen = () if chosen == ("none",) else chosen
        unknown = [name for name in chosen if name not in TRACKERS]
        if unknown:
            raise ValueError(f"tracking.report_to: unknown tracker {unknown[0]!r}; choose from "
                             f"{', '.join(TRACKERS)} (or none)")
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"tracking.report_to names a tracker twice: {list(chosen)}")
        object.__setattr__(self, "report_to", chosen)


PREFERENCE_LOSSES = ("dpo", "ipo", "simpo", "orpo")  # preference.loss (trainer/preference_loss.py)
REFERENCE_FREE = ("simpo", "orpo")  # objectives without a reference model


@dataclass(frozen=True)
class PreferenceConfig:
    """model.task: preference: the objective over chosen/rejected pairs (trainer/preference_loss.py)."""
    # dpo (sigmoid), ipo (squared, per-token averaged log-ratios), simpo (length-normalised, no
    # reference), orpo (NLL + odds ratio, no reference).
    loss: Literal["dpo", "ipo", "simpo", "orpo"] = "dpo"
    beta: float = 0.1  # dpo/simpo/orpo: the reward scale; ipo: the regularisation tau (target margin 1 / (2 beta))
    label_smoothing: float = 0.0  # dpo/simpo: the share of pairs assumed flipped (conservative DPO)
    gamma: float = 0.5  # simpo: the target reward margin
    # dpo/ipo: precomputed (the starting model's log-probabilities, computed once before training and
    # kept with the prepared data) or adapters_off (finetune.mode: lora: the base with the adapters
    # disabled, one more forward per micro-batch). Reference-free objectives use none.
    reference: Literal["precomputed", "adapters_off"] = "precomputed"

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ValueError(f"preference.beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"preference.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss not in ("dpo", "simpo"):
            raise ValueError(f"preference.label_smoothing applies to the dpo and simpo losses, not {self.loss!r}")
        if self.gamma < 0:
            raise ValueError(f"preference.gamma must be >= 0, got {self.gamma}")

    @property
    def needs_reference(self) -> bool:
        """The objective compares with the starting model's log-probabilities."""
        return self.loss not in REFERENCE_FREE

    @property
    def precomputed(self) -> bool:
        """The reference log-probabilities come from the pass before training."""
        return self.needs_reference and self.reference == "precomputed"


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
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)  # model.task: preference
    output_dir: Optional[str] = None  # default (set by the CLI): runs/<config file name>
    seed: int = 42

    def __post_init__(self) -> None:
        # What depends on the task (packing, metrics, generation) is checked by trainer/config_checks.py.
        p = self.preference
        if p.needs_reference and p.reference == "adapters_off" and self.finetune.mode != "lora":
            raise ValueError(f"preference.reference: adapters_off needs finetune.mode: lora (the base model with the "
                             f"adapters disabled is the reference), got finetune.mode {self.finetune.mode!r}; "
                             f"use preference.reference: precomputed")
        if self.test.checkpoint == "best" and self.train.eval_every % self.train.save_interval:
            raise ValueError(f"test.checkpoint: best tests the best evaluated checkpoint, so every evaluation must "
                             f"write one: train.eval_every ({self.train.eval_every}) must be a multiple of "
                             f"train.save_every ({self.train.save_interval})")

    @property
    def split_seed(self) -> int:
        return self.seed if self.data.split_seed is None else self.data.split_seed
