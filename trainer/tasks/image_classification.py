"""image_classification: an image (a PIL image, a path, {bytes|path} or a pixel array) -> one label.

The image processor (model.image_processor, or the model's own) resizes and normalises; no
train-time augmentation. Metrics as for sequence classification. Never imports ray.
"""
from __future__ import annotations

import io
from pathlib import Path

from trainer.config import DataConfig, RunConfig
from trainer.data import Prepared
from trainer.tasks.common import DROP, bad, encode_split, evaluate_labels, label_id, label_set, model_loss, \
    require_columns, require_rows, unknown_label

loss = model_loss  # the training objective (trainer/tasks/common.py)


def check_columns(split, d: DataConfig) -> None:
    require_columns(split, [(d.image_column, "data.image_column"), (d.label_column, "data.label_column")])


def label_names(cfg: RunConfig, train) -> list[str]:
    return label_set(cfg, train, cfg.data.label_column, "data.label_column", lambda value: [value])


def load_image(value, base: Path):
    """A PIL image from what a data set holds: a PIL image, a path, {'bytes'|'path': ...}, or pixels."""
    from PIL import Image

    if hasattr(value, "convert"):
        image = value
    elif isinstance(value, str):
        path = Path(value) if Path(value).is_absolute() else base / value
        image = Image.open(path)
    elif isinstance(value, dict) and value.get("bytes"):
        image = Image.open(io.BytesIO(value["bytes"]))
    elif isinstance(value, dict) and value.get("path"):
        image = Image.open(base / value["path"])
    elif isinstance(value, list):
        import numpy as np

        image = Image.fromarray(np.asarray(value, dtype="uint8"))
    else:
        raise ValueError(f"cannot make an image of a {type(value).__name__}")
    image.load()
    return image.convert("RGB")


def prepare(split, cfg: RunConfig, processor, labels: list[str], scratch=None) -> Prepared:
    """Pixel values (float32, as the processor makes them), the label id and the gold label name."""
    import numpy as np

    d = cfg.data
    require_rows(split)
    check_columns(split, d)
    base = Path(split.source).parent if Path(split.source).exists() else Path(".")

    def encode(batch: dict) -> dict:
        out: dict = {"pixel_values": [], "labels": [], "gold": [], DROP: []}
        for value, image_value in zip(batch[d.label_column], batch[d.image_column]):
            label, pixels, drop = label_id(value, labels), None, ""
            if label is None:
                drop = bad(d.label_column, unknown_label(value, labels))
            else:
                try:
                    image = load_image(image_value, base)
                    pixels = processor(images=image, return_tensors="np")["pixel_values"][0].astype(np.float32)
                except Exception as err:  # PIL raises many kinds for a missing or broken file
                    drop = bad(d.image_column, f"unreadable image ({type(err).__name__}: {str(err)[:160]})")
            out["pixel_values"].append(pixels)
            out["labels"].append(label if label is not None else -1)
            out["gold"].append(labels[label] if label is not None else "")
            out[DROP].append(drop)
        shape = next((p.shape for p in out["pixel_values"] if p is not None), (3, 1, 1))
        out["pixel_values"] = [p if p is not None else np.zeros(shape, np.float32) for p in out["pixel_values"]]
        return out

    return encode_split(split, cfg, encode, ("pixel_values", "labels"), fmt="numpy", scratch=scratch)


def collator(processor):
    from transformers import default_data_collator

    return default_data_collator


def count(examples: list[dict]) -> int:
    return len(examples)


evaluate = evaluate_labels  # loss, accuracy, macro F1, per-class F1 over gathered predictions
