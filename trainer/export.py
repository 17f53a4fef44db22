"""Write the consolidated model of a sharded DeepSpeed checkpoint as a plain transformers model folder.

Streamed (`export_model`): the tensors are read one at a time from DeepSpeed's lazy zero_to_fp32
state dict (ZeRO 1-3: the fp32 masters, memory-mapped) or from stage 0's memory-mapped module file,
converted to export.dtype and written straight into safetensors shards whose headers are laid out
first; no model is built with weights (a meta-device skeleton gives the names, the tied weights and
the config), so the peak is one tensor, not the model. A lean checkpoint's frozen weights are read,
tensor by tensor, from the base model's own safetensors files. LoRA merged streams too: each adapted
layer's weight is merged as it is read (`merged_lora_sources`). What the stream cannot source (peft's
adapter folder, export.lora: adapter | both; a layer peft merges otherwise, such as a convolution; a
frozen head that is new for the task; a base without safetensors) takes `export_built`: the whole
model built and filled, then `save_pretrained`. Never imports ray.
"""
from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path
from typing import Callable

from trainer.config import RunConfig
from trainer.checkpoints import TAG
from trainer.lora import trainable_model
from trainer.model import build_model, build_skeleton, prepare_pretrained

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# Shards of 5 GB, as the Hub's models come (transformers 5's save_pretrained defaults to "50GB"; the
# built export, for LoRA, writes with that default).
MAX_SHARD_BYTES = 5 * 1000**3
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def consolidated_state_dict(checkpoint: Path, zero_stage: int, lazy: bool = False) -> dict:
    """name -> tensor of the whole model in the checkpoint (fp32 masters under ZeRO 1-3). lazy: stage 0's
    file memory-mapped, ZeRO-3's parameters as DeepSpeed's GatheredTensor (`.contiguous()` reads one)."""
    import torch

    if zero_stage == 0:
        states = torch.load(checkpoint / TAG / "mp_rank_00_model_states.pt", map_location="cpu",
                            weights_only=False, mmap=lazy)
        return states["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=TAG, lazy_mode=lazy)


def export_dtype(cfg: RunConfig, trained_in: str) -> str:
    """export.dtype, where auto is the precision the run trained in (fp32, bf16 or fp16)."""
    return trained_in if cfg.export.dtype == "auto" else cfg.export.dtype


def export_model(cfg: RunConfig, checkpoint: Path, target: Path, processor, labels: list[str],
                 cache_dir: str, dtype: str = "fp32") -> str:
    """Write safetensors weights in `dtype` (fp32 / bf16 / fp16), config (with id2label for
    classifiers) and the tokenizer or image processor, loadable with the task's AutoModelFor... and
    usable in a transformers pipeline. Returns how: "streamed", or "built" (see the module docstring)."""
    import torch

    lora = cfg.finetune.mode == "lora"
    if lora and cfg.export.lora != "merged":  # peft's adapter folder is written from the built model
        export_built(cfg, checkpoint, target, processor, labels, cache_dir, dtype)
        return "built"
    model_dir = prepare_pretrained(cfg.model, cache_dir)
    skeleton = build_skeleton(cfg.model, model_dir, labels)
    names = saved_names(skeleton)
    checkpointed = consolidated_state_dict(checkpoint, cfg.deepspeed.zero_stage, lazy=True)
    meta = skeleton.state_dict()
    # The shapes are the model's (its skeleton's): a base weight of another shape (a head resized to the
    # task's labels, say) cannot be streamed as it lies in the base files.
    shapes = {n: tuple(meta[n].shape) for n in names}
    if lora:
        sources = merged_lora_sources(cfg, model_dir, labels, names, shapes, checkpointed)
    else:
        unexpected = sorted(set(checkpointed) - set(meta))
        if unexpected:
            raise RuntimeError(f"the checkpoint holds parameters the model lacks: {unexpected[:5]}")
        base = base_tensors(model_dir, [n for n in names if n not in checkpointed])
        sources = {n: (lambda n=n: checkpointed[n].contiguous(), checkpointed[n].dtype) if n in checkpointed
                   else (base[n][0], base[n][2]) for n in names
                   if n in checkpointed or (n in base and base[n][1] == shapes[n])}
    if sources is None or len(sources) < len(names):
        del checkpointed
        export_built(cfg, checkpoint, target, processor, labels, cache_dir, dtype)
        return "built"
    to = getattr(torch, DTYPES[dtype])
    kinds = {n: to if sources[n][1].is_floating_point else sources[n][1] for n in names}

    def tensor(name: str):
        return sources[name][0]().to(kinds[name])

    def write(staging: Path) -> None:
        write_safetensors(staging, names, shapes, kinds, tensor)
        config = skeleton.config
        config.dtype = DTYPES[dtype]  # what save_pretrained records
        config.architectures = [type(skeleton).__name__]
        config.save_pretrained(staging)
        if skeleton.can_generate():
            generation_config(skeleton, model_dir).save_pretrained(staging)

    _staged(target, write, cfg, processor)
    return "streamed"


PEFT_PREFIX = "base_model.model."  # peft's names: the wrapped model's, under this prefix


def merged_lora_sources(cfg: RunConfig, model_dir: str | None, labels: list[str], names: list[str],
                        shapes: dict, checkpointed: dict) -> dict[str, tuple[Callable, object]] | None:
    """name -> (read it, dtype) of the merged LoRA model's tensors: an adapted layer's weight is its base
    weight plus peft's delta, `transpose(B @ A, fan_in_fan_out) * scaling` (as merge_and_unload adds it,
    in fp32), read one layer at a time; a fully trained module's weights come from its
    `modules_to_save` copy; the rest from the checkpoint or, for a lean one, the base files. None where
    the stream cannot merge (a layer peft merges otherwise: convolution, DoRA, a LoRA bias); names
    missing from the result cannot be sourced. The names are the plain model's (the skeleton's)."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.lora.layer import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    from trainer.lora import ADAPTER

    wrapped, _ = trainable_model(build_skeleton(cfg.model, model_dir, labels), cfg.finetune)
    plain = lambda name: name[len(PEFT_PREFIX):]  # noqa: E731
    layers = {plain(n): m for n, m in wrapped.named_modules() if isinstance(m, LoraLayer)}
    if any(type(m) is not LoraLinear or m.use_dora.get(ADAPTER) or m.lora_bias.get(ADAPTER) for m in layers.values()):
        return None
    full = [plain(n) for n, m in wrapped.named_modules() if isinstance(m, ModulesToSaveWrapper)]

    def stored(name: str) -> str:
        module, param = name.rsplit(".", 1)
        if module in layers:
            return f"{PEFT_PREFIX}{module}.base_layer.{param}"
        owner = next((f for f in full if name.startswith(f + ".")), None)
        if owner is not None:
            return f"{PEFT_PREFIX}{owner}.modules_to_save.{ADAPTER}.{name[len(owner) + 1:]}"
        return PEFT_PREFIX + name

    def merged(read: Callable, module: str) -> Callable:
        layer, prefix = layers[module], f"{PEFT_PREFIX}{module}"
        a, b = checkpointed[f"{prefix}.lora_A.{ADAPTER}.weight"], checkpointed[f"{prefix}.lora_B.{ADAPTER}.weight"]

        def value():
            delta = b.contiguous().float() @ a.contiguous().float()
            return read().float() + (delta.T if layer.fan_in_fan_out else delta) * layer.scaling[ADAPTER]
        return value

    base = base_tensors(model_dir, [n for n in names if stored(n) not in checkpointed])  # a lean checkpoint's
    sources = {}
    for name in names:
        key = stored(name)
        if key in checkpointed:
            read, kind = (lambda key=key: checkpointed[key].contiguous()), checkpointed[key].dtype
        elif name in base and base[name][1] == shapes[name]:
            read, kind = base[name][0], base[name][2]
        else:
            continue
        module, param = name.rsplit(".", 1)
        if module in layers and param == "weight":
            if f"{PEFT_PREFIX}{module}.lora_A.{ADAPTER}.weight" not in checkpointed:
                continue
            read = merged(read, module)
        sources[name] = (read, kind)
    return sources


def saved_names(skeleton) -> list[str]:
    """The state-dict names save_pretrained writes for this model: a tied weight once (under the name
    transformers reloads it by), _keys_to_ignore_on_save left out. The skeleton is on the meta device."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = remove_tied_weights_from_state_dict(skeleton.state_dict(), skeleton)
    ignored = set(getattr(skeleton, "_keys_to_ignore_on_save", None) or ())
    return sorted(n for n in state if n not in ignored)


def base_tensors(model_dir: str | None, names: list[str]) -> dict[str, tuple[Callable, tuple, object]]:
    """name -> (read it, shape, dtype) for the `names` found in the base model's safetensors files:
    a lean checkpoint's frozen weights, as from_pretrained would load them."""
    if not names or model_dir is None:
        return {}
    from safetensors import safe_open

    folder = Path(model_dir)
    index = folder / INDEX
    if index.is_file():
        where = {n: folder / f for n, f in json.loads(index.read_text())["weight_map"].items()}
    elif (folder / WEIGHTS).is_file():
        with safe_open(folder / WEIGHTS, "pt") as f:
            where = {n: folder / WEIGHTS for n in f.keys()}
    else:
        return {}
    found = {}
    for name in names:
        if name not in where:
            continue
        with safe_open(where[name], "pt") as f:
            piece = f.get_slice(name)
            shape, kind = tuple(piece.get_shape()), _torch_dtype(piece.get_dtype())
        found[name] = (lambda path=where[name], name=name: _read(path, name), shape, kind)
    return found


def _read(path: Path, name: str):
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return f.get_tensor(name)


ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
             "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _torch_dtype(code: str):
    import torch

    return getattr(torch, ST_DTYPES[code])


def write_safetensors(folder: Path, names: list[str], shapes: dict, kinds: dict, tensor: Callable,
                      max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """`model.safetensors`, or shards `model-0000i-of-0000n.safetensors` of at most max_shard_bytes (a
    larger tensor alone) with `model.safetensors.index.json`, as save_pretrained names them. Each shard's
    header is written first (shapes and dtypes are known), then the tensors one at a time: `tensor(name)`
    is called once per name and dropped once written."""
    import torch

    codes = {getattr(torch, v): k for k, v in ST_DTYPES.items()}
    sizes = {n: math.prod(shapes[n]) * kinds[n].itemsize for n in names}
    shards: list[list[str]] = [[]]
    filled = 0  # bytes in the last shard
    for name in names:
        if shards[-1] and filled + sizes[name] > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += sizes[name]
    files = [WEIGHTS] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, members in zip(files, shards):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in members:
            header[name] = {"dtype": codes[kinds[name]], "shape": list(shapes[name]),
                            "data_offsets": [offset, offset + sizes[name]]}
            offset += sizes[name]
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        with open(folder / file, "wb") as out:
            out.write(struct.pack("<Q", len(text)) + text)
            for name in members:
                value = tensor(name)
                if tuple(value.shape) != tuple(shapes[name]) or value.dtype != kinds[name]:
                    raise RuntimeError(f"export: {name} is {tuple(value.shape)} {value.dtype}, "
                                       f"expected {shapes[name]} {kinds[name]}")
                out.write(value.contiguous().reshape(-1).view(torch.uint8).numpy().data)
                del value
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())},
                 "weight_map": {n: f for f, members in zip(files, shards) for n in members}}
        (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def generation_config(skeleton, model_dir: str | None):
    """The base model's generation_config.json where it has one (what from_pretrained loads), else the
    one transformers derives from the model config."""
    from transformers import GenerationConfig

    if model_dir is not None and (Path(model_dir) / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(model_dir)
    return skeleton.generation_config


def export_built(cfg: RunConfig, checkpoint: Path, target: Path, processor, labels: list[str],
                 cache_dir: str, dtype: str = "fp32") -> None:
    """The export by a whole model: built, filled from the consolidated state dict, save_pretrained.
    LoRA (adapter and merged) goes this way; so does what the stream cannot source."""
    import torch

    torch.manual_seed(cfg.seed)  # an inline architecture's frozen weights come from the seed
    model = build_model(cfg.model, prepare_pretrained(cfg.model, cache_dir), labels)
    model, _ = trainable_model(model, cfg.finetune)  # with LoRA: the adapters, named as in the checkpoint
    state = consolidated_state_dict(checkpoint, cfg.deepspeed.zero_stage)
    result = model.load_state_dict(state, strict=False)
    del state
    if result.unexpected_keys:
        raise RuntimeError(f"the checkpoint holds parameters the model lacks: {result.unexpected_keys[:5]}")
    model.to(getattr(torch, DTYPES[dtype]))
    if cfg.finetune.mode == "lora":
        if cfg.export.lora in ("adapter", "both"):  # peft's format: PeftModel.from_pretrained(base, path)
            model.save_pretrained(adapter_dir(target), safe_serialization=True)
        if cfg.export.lora == "adapter":
            return
        model = model.merge_and_unload()  # a plain transformers model, no peft needed to load it
    _staged(target, lambda staging: model.save_pretrained(staging, safe_serialization=True), cfg, processor)


def _staged(target: Path, write: Callable[[Path], None], cfg: RunConfig, processor) -> None:
    """`write` the model into a staging folder, add the processor, then rename it to `target`: an
    export cut short (a full disk, a kill) never leaves a final_model/ that looks whole."""
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        write(staging)
        if cfg.data.chat_template:  # the template the data was rendered with goes with the tokenizer
            from trainer.chat import TEMPLATES

            processor.chat_template = TEMPLATES.get(cfg.data.chat_template, cfg.data.chat_template)
        processor.save_pretrained(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # give back what it took of a full disk
        raise
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def adapter_dir(final_model: Path) -> Path:
    """Where export.lora: adapter | both writes the LoRA adapter: beside final_model/."""
    return final_model.parent / "final_adapter"
