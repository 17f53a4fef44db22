"""The reference of a preference objective: the starting model's per-example log-probabilities,
computed ONCE before training and kept with the prepared data.

`ensure` runs the pass, every rank together, when no stored reference fits the run: a fresh model
and engine with the starting weights (trainer/worker.py setup), each split's examples sharded
exactly across ranks (Shard: each once), gathered, written by rank 0 into a staging folder and
renamed into place (a crash never leaves half a reference); then that engine is released, so that
training never holds a second model. The folder is keyed by the starting weights themselves (a
hash of their files, not their path: an SFT run exporting into the same folder changes them, or of
the inline architecture and seed), the precision and the prepared data's own key (which covers
data.max_length, the truncation): a second run on the same data and weights reuses it. `attach`
adds the stored values to a prepared split as the per-example columns the task's loss reads.
Never imports ray.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from trainer.config import ConfigError, RunConfig
from trainer.data import Prepared

META = "reference.json"  # written last: a folder without it is not a reference
SPLITS = ("train", "validation", "test")
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "config.json")


def weights_digest(cfg: RunConfig, model_dir: Optional[str]) -> str:
    """A hash of the starting weights: their files' bytes (a local folder), else the hub id (its
    files are not read here), or the inline architecture with the seed that initialises it."""
    h = hashlib.blake2b(digest_size=16)
    if model_dir is None:
        h.update(json.dumps({"architecture": cfg.model.architecture, "seed": cfg.seed}, sort_keys=True).encode())
        return h.hexdigest()
    folder = Path(model_dir)
    if not folder.is_dir():
        h.update(f"hub:{model_dir}".encode())
        return h.hexdigest()
    files = sorted({f for pattern in WEIGHT_FILES for f in folder.glob(pattern)})
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def reference_key(cfg: RunConfig, weights: str, precision: str, data_key: str) -> str:
    """What the stored log-probabilities depend on: the weights, how the model computes (precision,
    attention implementation), and the prepared examples (data_key: the data, data.max_length, the
    tokenizer and the task's code)."""
    model = {k: v for k, v in asdict(cfg.model).items() if k not in ("name_or_path", "gguf_file")}
    text = json.dumps({"weights": weights, "precision": precision, "data": data_key, "model": model}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def folder_for(cfg: RunConfig, root: Path, model_dir: Optional[str], precision: str, processor) -> Path:
    """Where this run's reference lives: beside the prepared data (`root`: its folder, or the launch's
    cache folder when the data is prepared in memory)."""
    from trainer.data_cache import cache_key

    return root / f"reference-{reference_key(cfg, weights_digest(cfg, model_dir), precision, cache_key(cfg, processor))}"


def is_complete(folder: Path) -> bool:
    return (folder / META).is_file()


def write(folder: Path, values: dict[str, list[tuple[float, float]]], seconds: float) -> None:
    """Rank 0: every split's (chosen, rejected) log-probabilities, staged then renamed into place."""
    import numpy as np

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".reference-", dir=folder.parent))
    try:
        for name, pairs in values.items():
            np.save(staging / f"{name}.npy", np.asarray(pairs, dtype=np.float64).reshape(-1, 2))
        (staging / META).write_text(json.dumps({"splits": {n: len(v) for n, v in values.items()},
                                                "seconds": round(seconds, 2)}))
        try:
            staging.rename(folder)
        except OSError:  # another run wrote the same reference meanwhile: theirs is as good
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def attach(prepared: Prepared, folder: Path, split: str) -> Prepared:
    """The split with the reference's per-example columns (ref_chosen, ref_rejected) among its inputs."""
    import numpy as np

    from trainer.tasks.preference import REF_CHOSEN, REF_REJECTED

    values = np.load(folder / f"{split}.npy")
    if len(values) != len(prepared):
        raise ConfigError(f"{folder}: the stored reference of the {split} split has {len(values)} examples, the "
                          f"prepared split {len(prepared)}; delete the folder to compute it again")
    table = prepared.table.add_column(REF_CHOSEN, values[:, 0].tolist()).add_column(REF_REJECTED, values[:, 1].tolist())
    return Prepared(table, (*prepared.inputs, REF_CHOSEN, REF_REJECTED), prepared.fmt, prepared.rows_read,
                    prepared.dropped, prepared.packed, prepared.parts)


def location(cfg: RunConfig, args) -> Path:
    """This run's reference folder (the workers' WorkerArgs `args`), as setup finds it."""
    import torch

    from trainer.ds_config import resolve_precision
    from trainer.model import load_processor, prepare_pretrained

    on_gpu = torch.cuda.is_available()
    precision = resolve_precision(cfg.deepspeed.precision, on_gpu, on_gpu and torch.cuda.is_bf16_supported())
    model_dir = prepare_pretrained(cfg.model, args.cache_dir)
    return folder_for(cfg, root_for(args), model_dir, precision, load_processor(cfg.model, model_dir))


def root_for(args) -> Path:
    """Beside the prepared data; in the cache folder when the data is prepared in memory."""
    return Path(args.data_dir) if args.data_dir else Path(args.cache_dir) / "preference-reference"


def ensure(cfg: RunConfig, args, reporter) -> Optional[Path]:
    """Compute and store the reference unless a stored one fits (every rank calls this together);
    its folder, for setup to attach (None for tasks and objectives without a precomputed reference).
    Rank 0 alone locates it (hashing the weights' files) and tells the others."""
    import gc

    import torch.distributed as dist

    from trainer.engine import release_engine
    from trainer.tasks.registry import TASKS, get_task
    from trainer.worker import one_pass, setup

    if not TASKS[cfg.model.task].references or not get_task(cfg.model.task).needs_reference(cfg):
        return None
    rank = dist.get_rank()
    log = reporter.log if rank == 0 else (lambda text: None)
    found = [str(location(cfg, args)), False] if rank == 0 else [None, None]
    if rank == 0:
        found[1] = is_complete(Path(found[0]))
    dist.broadcast_object_list(found, src=0)  # every rank decides as rank 0 sees the storage
    folder = Path(found[0])
    if found[1]:
        log(f"reference: cached ({folder})")
        return folder
    started = time.perf_counter()
    s = setup(cfg, args, SPLITS, reporter, with_reference=False)
    log(f"reference: the starting model's log-probabilities of {sum(len(p) for p in s.data.values()):,} pairs "
        f"(one forward pass over the train, validation and test splits)")
    s.engine.eval()
    with one_pass(s):
        values = {name: s.task.reference_logps(s.shard, s.data[name]) for name in SPLITS}
    if rank == 0:
        from trainer.storage import writing

        with writing("the reference log-probabilities", folder):
            write(folder, values, time.perf_counter() - started)
    dist.barrier()  # every rank reads what rank 0 wrote (shared storage across nodes: data.cache_dir)
    log(f"reference: computed in {time.perf_counter() - started:.1f} s into {folder}")
    release_engine(s.engine)  # training never holds a second model
    del s
    gc.collect()
    return folder
