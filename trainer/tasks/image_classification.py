"""image_classification: an image (a PIL image, a path, {bytes|path} or a pixel array) -> one label.

The image processor (model.image_processor, or the model's own) resizes and normalises; no
train-time augmentation. Metrics as for sequence classification. Never imports ray.
"""
from __future__ import annotations

import io
from pathlib import Path

from trainer.config import DataConfig, RunConfig
from trainer.tasks.common import BadRows, Prepared, evaluate_labels, label_id, label_set, require_columns, require_rows, \
    unknown_label

AUTO_MODEL = "AutoModelForImageClassification"
PROCESSOR = "image_processor"
UNIT = "samples"


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


def prepare(split, cfg: RunConfig, processor, labels: list[str]) -> Prepared:
    d = cfg.data
    require_rows(split)
    check_columns(split, d)
    rows, out = BadRows(split, d.skip_bad_rows), Prepared([])
    base = Path(split.source).parent if Path(split.source).exists() else Path(".")
    for i, r in enumerate(split.records):
        label = label_id(r[d.label_column], labels)
        if label is None:
            rows.bad(i, d.label_column, unknown_label(r[d.label_column], labels))
            continue
        try:
            image = load_image(r[d.image_column], base)
        except Exception as err:  # PIL raises many kinds for a missing or broken file
            rows.bad(i, d.image_column, f"unreadable image ({type(err).__name__}: {str(err)[:160]})")
            continue
        pixels = processor(images=image, return_tensors="pt")["pixel_values"][0]
        out.add({"pixel_values": pixels, "labels": label}, split.row(i), labels[label])
    out.dropped = rows.skipped
    return out


def collator(processor):
    from transformers import default_data_collator

    return default_data_collator


def count(batch: dict) -> int:
    return len(batch["labels"])


evaluate = evaluate_labels  # loss, accuracy, macro F1, per-class F1 over gathered predictions
