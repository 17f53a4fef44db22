"""Data prepared once: every split as model inputs, in an Arrow folder keyed by what changes them.

`prepare` reads the source, runs the task's preparation (`datasets.map`, data.num_proc processes)
on all three splits and, with data.packing, packs the training split; it writes them into
`<data.cache_dir>/<task>-<key>/` (staged, then renamed into place, so a crash never leaves half a
cache) — or, with no cache folder, keeps them in memory. The key hashes everything that changes
the result: the data files' bytes (a `datasets` name and config for hub data), the data.* keys
that shape examples, the split seed, the tokenizer or image processor, and the source of the
preparation code. `load` reads a prepared folder memory-mapped: no rank holds a split as Python
objects. The launcher prepares once per run before any worker starts; workers, their restarts,
--resume and the test evaluation load what it wrote. Never imports ray or deepspeed.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from trainer.config import ConfigError, RunConfig
from trainer.data import Prepared
from trainer.tasks.registry import TASKS, get_task

META = "prepared.json"  # written last: a folder without it is not a cache
VERSION = 1
# data.* keys that do not change a prepared example.
UNKEYED = ("cache_dir", "num_proc")
CODE = ("trainer/data.py", "trainer/data_cache.py", "trainer/masking.py", "trainer/tasks/common.py",
        "trainer/conversation.py", "trainer/chat.py")


@dataclass
class PreparedData:
    splits: dict[str, Prepared]
    labels: list[str]
    directory: Optional[Path]  # None: prepared in memory
    seconds: float = 0.0  # spent preparing (0 when it came from the cache)

    def describe(self) -> list[str]:
        """What a user reads about the data besides its sizes: packing, rows left out and why."""
        lines = [f"{name}: examples packed into {len(p):,} rows of up to data.max_length tokens"
                 for name, p in self.splits.items() if p.packed]
        for name, p in self.splits.items():
            if p.dropped:
                lines.append(f"{name}: left out {sum(p.dropped.values()):,} of {p.rows_read:,} rows "
                             f"({p.describe_dropped()})")
        return lines


def cache_root(cfg: RunConfig) -> Path:
    return Path(cfg.data.cache_dir or Path(cfg.output_dir) / "data_cache").resolve()


def _file_digest(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_key(cfg: RunConfig, processor) -> str:
    from datasets.fingerprint import Hasher

    d = cfg.data
    h = hashlib.sha256()
    shaping = {k: v for k, v in asdict(d).items() if k not in UNKEYED}
    shaping["train_file"] = [src.path for src in d.sources]  # a mix's weights only order the draws
    h.update(json.dumps({"version": VERSION, "task": cfg.model.task, "data": shaping, "split_seed": cfg.split_seed},
                        sort_keys=True, default=str).encode())
    for path in (*(src.path for src in d.sources), d.validation_file, d.test_file):
        if path is not None:
            h.update(_file_digest(path).encode())
    h.update(Hasher.hash(processor).encode())
    root = Path(__file__).resolve().parents[1]
    for source in (*CODE, TASKS[cfg.model.task].module.replace(".", "/") + ".py"):
        h.update((root / source).read_bytes())
    return h.hexdigest()[:20]


def prepare(cfg: RunConfig, processor, root: Optional[Path], log: Callable[[str], None] = print) -> PreparedData:
    """The three prepared splits: from `root` when this data was prepared there before, else
    prepared now (into `root`, or in memory when it is None). ConfigError on bad data."""
    if root is None:
        return _prepare(cfg, processor, None)
    directory = root / f"{cfg.model.task}-{cache_key(cfg, processor)}"
    if (directory / META).is_file():
        data = load(directory)
        log(f"data: cached ({directory})")
        return data
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".preparing-", dir=root))
    try:
        scratch = staging / "scratch"
        scratch.mkdir()
        data = _prepare(cfg, processor, scratch)
        meta = {"labels": data.labels, "seconds": round(data.seconds, 2), "splits": {}}
        for name, p in data.splits.items():
            p.table.save_to_disk(str(staging / name))
            meta["splits"][name] = {"inputs": list(p.inputs), "fmt": p.fmt, "rows_read": p.rows_read,
                                    "dropped": p.dropped, "packed": p.packed, "parts": list(p.parts)}
        shutil.rmtree(scratch)
        (staging / META).write_text(json.dumps(meta, indent=1))
        try:
            staging.rename(directory)
        except OSError:  # another launch prepared the same data meanwhile: theirs is as good
            pass
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(root.iterdir()):
            root.rmdir()  # bad data leaves nothing behind
        raise
    shutil.rmtree(staging, ignore_errors=True)
    log(f"data: prepared in {data.seconds:.1f} s into {directory}")
    prepared = load(directory)
    prepared.seconds = data.seconds
    return prepared


def load(directory: Path) -> PreparedData:
    """A prepared folder, memory-mapped."""
    import datasets

    meta = json.loads((directory / META).read_text())
    splits = {name: Prepared(datasets.load_from_disk(str(directory / name)), tuple(m["inputs"]), m["fmt"],
                             m["rows_read"], m["dropped"], m["packed"], tuple(m.get("parts", ())))
              for name, m in meta["splits"].items()}
    return PreparedData(splits, meta["labels"], directory)


def _prepare(cfg: RunConfig, processor, scratch: Optional[Path]) -> PreparedData:
    import datasets

    from trainer.data import load_splits

    started = time.perf_counter()
    task = get_task(cfg.model.task)
    sources, validation, test = load_splits(cfg)
    labels = training_labels(cfg, task, sources)
    big = any(len(s) >= 20_000 for s in (*sources, validation, test))
    (datasets.enable_progress_bars if big and scratch is not None else datasets.disable_progress_bars)()
    splits = {"train": prepare_training(cfg, task, sources, processor, labels, scratch)}
    splits.update({s.name: task.prepare(s, cfg, processor, labels, scratch) for s in (validation, test)})
    return PreparedData(splits, labels, None, time.perf_counter() - started)


def training_labels(cfg: RunConfig, task, sources: list) -> list[str]:
    """The label set of the training split; a mix's sources must agree on it (or data.labels sets it)."""
    found = [task.label_names(cfg, s) for s in sources]
    for s, labels in zip(sources[1:], found[1:]):
        if labels != found[0]:
            raise ConfigError(f"data.train_file: the sources have different label sets ({sources[0].source}: "
                              f"{found[0][:8]}, {s.source}: {labels[:8]}); list the labels of the whole mix in "
                              f"data.labels")
    return found[0]


def prepare_training(cfg: RunConfig, task, sources: list, processor, labels: list[str],
                     scratch: Optional[Path]) -> Prepared:
    """The training split: each source prepared (and packed) on its own, so errors name its file and
    no packed row mixes sources; a mix's tables are then concatenated in order (Prepared.parts)."""
    import datasets

    parts = []
    for i, source in enumerate(sources):
        where = scratch / f"source-{i}" if scratch is not None and len(sources) > 1 else scratch
        if where is not None:
            where.mkdir(exist_ok=True)
        prepared = task.prepare(source, cfg, processor, labels, where)
        parts.append(task.pack(prepared, cfg, where) if cfg.data.packing else prepared)
    if len(parts) == 1:
        return parts[0]
    dropped: dict = {}
    for p in parts:
        for why, n in p.dropped.items():
            dropped[why] = dropped.get(why, 0) + n
    first = parts[0]
    return Prepared(datasets.concatenate_datasets([p.table for p in parts]), first.inputs, first.fmt,
                    sum(p.rows_read for p in parts), dropped, first.packed, tuple(len(p) for p in parts))
