"""Data: read the train / validation / test splits, and deal a prepared split out as micro-batches.

Reading uses `datasets` (jsonl/json/csv/parquet files or a datasets name): a split is an Arrow
table, memory-mapped from disk, never a list of Python records; every record keeps its row in the
source file, so errors name the row a user can find. How a task turns records into model inputs
lives in its module (trainer/tasks/); the result is a `Prepared` split, which trainer/data_cache.py
keeps. The loop sees an endless, resumable stream of micro-batches (`micro_batches`). Never imports ray.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from trainer.config import ConfigError, RunConfig
from trainer.splits import split_indices

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def describe_row(source: str, row: int) -> str:
    """Source row `row` (0-based) as a user finds it: the line of a jsonl file, the data row of a csv
    or parquet file, the row of a hub split."""
    n = row + 1
    suffix = Path(source).suffix.lower()
    if suffix == ".jsonl":
        return f"line {n}"
    if suffix == ".csv":
        return f"row {n} (line {n + 1}, after the header)"
    return f"row {n}" if suffix in FORMATS else f"row {row}"


@dataclass
class Split:
    name: str
    source: str  # a file path or "<dataset>:<split>", for error messages
    table: Any  # a datasets.Dataset of the raw records
    class_names: dict = field(default_factory=dict)  # column -> label names of a ClassLabel column
    rows: Optional[Sequence[int]] = None  # each record's row in the source (0-based); None: its position

    @classmethod
    def from_records(cls, name: str, source: str, records: list[dict], class_names: Optional[dict] = None) -> "Split":
        import datasets

        return cls(name, source, datasets.Dataset.from_list(records), class_names or {})

    def __len__(self) -> int:
        return len(self.table)

    @property
    def columns(self) -> list[str]:
        return list(self.table.column_names)

    def values(self, column: str, batch_size: int = 10_000) -> Iterator[Any]:
        """Every value of one column, read a batch at a time."""
        for batch in self.table.select_columns([column]).iter(batch_size=batch_size):
            yield from batch[column]

    def sample(self, n: int) -> "Split":
        n = min(n, len(self))
        return Split(self.name, self.source, self.table.select(range(n)), self.class_names,
                     self.rows[:n] if self.rows is not None else None)


def _class_names(ds) -> dict:
    """Names of the ClassLabel columns (or sequences of ClassLabel, as NER tags often are)."""
    out = {}
    for column, feature in ds.features.items():
        names = getattr(feature, "names", None) or getattr(getattr(feature, "feature", None), "names", None)
        if names:
            out[column] = list(names)
    return out


def _read_file(path: str, key: str):
    import datasets

    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ConfigError(f"data.{key}: {path} has an unsupported extension {suffix!r}; "
                          f"expected one of {', '.join(FORMATS)}")
    if not Path(path).is_file():
        raise ConfigError(f"data.{key}: file {path} not found")
    if Path(path).stat().st_size == 0:
        return datasets.Dataset.from_dict({})
    try:
        ds = datasets.load_dataset(FORMATS[suffix], data_files=path, split="train")
        ds.data.validate(full=True)  # the csv reader lets invalid UTF-8 through; decoding it later fails
        return ds
    except Exception as err:  # datasets raises many kinds for a malformed file, wrapping the parser's
        while (err.__cause__ or err.__context__) is not None and "generating the dataset" in str(err):
            err = err.__cause__ or err.__context__
        utf8 = isinstance(err, UnicodeDecodeError) or "invalid utf8" in str(err).lower()
        why = "not UTF-8 text" if utf8 else _first_line(err)
        raise ConfigError(f"data.{key}: cannot read {path} as {FORMATS[suffix]} ({why})") from None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def load_splits(cfg: RunConfig) -> tuple[tuple[Split, ...], Split, Split]:
    """The training sources (one split per data.train_file entry, in order; one for a single file or
    a `datasets` name), validation and test: tables read into `datasets`' own Arrow cache,
    memory-mapped. Without validation and test files the (first) training file is split by
    data.fractions and the seed; the other sources of a mix are used whole for training."""
    import datasets

    datasets.disable_progress_bars()  # preparation shows one where the data is large
    # datasets logs a parse error before raising it; the ConfigError below says it once, better.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    d = cfg.data
    if d.train_file is not None:
        keys = ["train_file"] if isinstance(d.train_file, str) else [f"train_file[{i}]" for i in range(len(d.sources))]
        tables = [_read_file(src.path, key) for src, key in zip(d.sources, keys)]
        names = _class_names(tables[0])
        others = tuple(Split("train", src.path, t, names) for src, t in zip(d.sources[1:], tables[1:]))
        if d.validation_file is not None:
            return ((Split("train", d.sources[0].path, tables[0], names), *others),
                    Split("validation", d.validation_file, _read_file(d.validation_file, "validation_file"),
                          names),
                    Split("test", d.test_file, _read_file(d.test_file, "test_file"), names))
        train, source = tables[0], d.sources[0].path
    else:
        try:
            loaded = datasets.load_dataset(d.dataset, d.dataset_config)
        except Exception as err:
            raise ConfigError(f"data.dataset: cannot load {d.dataset!r} ({_first_line(err)})") from None
        if "train" not in loaded:
            raise ConfigError(f"data.dataset {d.dataset!r} has no 'train' split (it has {', '.join(loaded)})")
        names = _class_names(loaded["train"])
        if "validation" in loaded and "test" in loaded:
            return ((Split("train", f"{d.dataset}:train", loaded["train"], names),),
                    *(Split(k, f"{d.dataset}:{k}", loaded[k], names) for k in ("validation", "test")))
        train, source, others = loaded["train"], f"{d.dataset}:train", ()
    parts = split_indices(len(train), d.fractions, cfg.split_seed)
    first, validation, test = (Split(name, source, train.select(part), names, part)
                               for name, part in zip(("train", "validation", "test"), parts))
    return (first, *others), validation, test


@dataclass
class Prepared:
    """A split as model inputs (a task's `prepare` makes it): an Arrow table (memory-mapped when it
    comes from the data cache) with the model's input columns, each example's source row (ROW of
    trainer/tasks/common.py) and the task's own columns (gold answers, what its evaluation needs).
    Examples are read a micro-batch at a time."""
    table: Any  # datasets.Dataset
    inputs: tuple[str, ...]  # the columns the collator gets
    fmt: Optional[str] = None  # the datasets format of the inputs (None: Python lists; "numpy" for pixels)
    rows_read: int = 0  # rows of the split before any was left out
    dropped: dict = field(default_factory=dict)  # why -> rows left out
    packed: bool = False  # each row holds several examples (data.packing)
    # A training mix: each source's rows, its sources' tables concatenated in this order (trainer/mixing.py).
    parts: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self._inputs = self.table.select_columns(list(self.inputs)).with_format(self.fmt)

    def __len__(self) -> int:
        return len(self.table)

    def examples(self, positions: Sequence[int]) -> list[dict]:
        """The model inputs of these examples, for the collator."""
        return self._inputs.__getitems__(list(positions))

    def column(self, name: str, positions: Sequence[int]) -> list:
        return self.table.select_columns([name])[list(positions)][name]

    def describe_dropped(self) -> str:
        return "; ".join(f"{n} {why}" for why, n in self.dropped.items())


class MicroBatches:
    """Endless micro-batches for one rank, resumable at a global position, also on another world size.

    Epoch e shuffles the examples exactly as DistributedSampler(shuffle=True, seed=seed) does for
    epoch e (a training mix: `order` gives the epoch's draws instead). `position` counts the places
    of that permutation already consumed by all ranks together; the rest is padded (by repeating the permutation's head, as DistributedSampler does)
    to a multiple of the world size and dealt out rank by rank. On the same world size this is
    DistributedSampler's own order; on another, no example of the epoch is seen twice or skipped.
    Each item is the list of the micro-batch's examples (a task's count reads them before collation).
    """

    def __init__(self, examples, rank: int, world: int, micro_batch_size: int, seed: int,
                 epoch: int = 0, position: int = 0, order: Optional[Callable[[int], list[int]]] = None):
        """`examples`: anything with len() and examples(positions) -> list of dicts (a Prepared).
        `order(epoch)`: that epoch's permutation (a training mix's draws, trainer/mixing.py) in place
        of the shuffle; the same on every rank."""
        self.examples, self.rank, self.world = examples, rank, world
        self.micro_batch_size, self.seed = micro_batch_size, seed
        self.epoch, self.position = epoch, position
        self.order = order
        self._mine: list[int] | None = None
        self._next = 0

    def _deal(self) -> None:
        import torch

        if self.order is not None:
            order = self.order(self.epoch)
        else:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.examples), generator=g).tolist()
        n = len(order)
        rest = order[self.position:]
        pad = -len(rest) % self.world
        rest += (order * (pad // n + 1))[:pad]
        self._mine, self._next, self._start = rest[self.rank::self.world], 0, self.position
        self._length = len(rest)

    def __iter__(self):
        return self

    def __next__(self) -> list[dict]:
        if self._mine is None:
            self._deal()
        b, m = self._next, self.micro_batch_size
        chunk = self._mine[b * m:(b + 1) * m]
        self._next += 1
        self.position = self._start + min(self._next * m * self.world, self._length)
        if self._next * m >= len(self._mine):  # the epoch is used up
            self.epoch, self.position, self._mine = self.epoch + 1, 0, None
        return self.examples.examples(chunk)


def micro_batches(cfg: RunConfig, train: Prepared, rank: int, world: int, epoch: int, position: int) -> MicroBatches:
    """This rank's stream of training micro-batches from the saved data position (epoch, position);
    a training mix draws from its sources by their weights (trainer/mixing.py)."""
    from trainer import mixing

    parts, weights = train.parts, [source.weight for source in cfg.data.sources]
    order = (lambda e: mixing.epoch_order(parts, weights, cfg.seed, e)) if len(parts) > 1 else None
    return MicroBatches(train, rank, world, cfg.train.micro_batch_size, cfg.seed, epoch=epoch, position=position,
                        order=order)
