"""SFT data: read the splits, render and tokenize examples with response-only labels, and batch them.

Reading uses `datasets` (jsonl/json/csv/parquet files or a datasets name); rendering uses the
tokenizer's chat template. The loop sees an endless, resumable stream of micro-batches (of any
task's examples). Never imports ray.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from launcher.config import ConfigError, DataConfig, RunConfig
from trainer.masking import IGNORE, chat_text, mask_labels, plain_text
from trainer.splits import split_indices

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class Split:
    name: str
    source: str  # a file path or "<dataset>:<split>", for error messages
    records: list[dict]
    class_names: dict = field(default_factory=dict)  # column -> label names of a ClassLabel column


def _class_names(ds) -> dict:
    """Names of the ClassLabel columns (or sequences of ClassLabel, as NER tags often are)."""
    out = {}
    for column, feature in ds.features.items():
        names = getattr(feature, "names", None) or getattr(getattr(feature, "feature", None), "names", None)
        if names:
            out[column] = list(names)
    return out


def _read_file(path: str, key: str) -> tuple[list[dict], dict]:
    import datasets

    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ConfigError(f"data.{key}: {path} has an unsupported extension {suffix!r}; "
                          f"expected one of {', '.join(FORMATS)}")
    if not Path(path).is_file():
        raise ConfigError(f"data.{key}: file {path} not found")
    if Path(path).stat().st_size == 0:
        return [], {}
    try:
        ds = datasets.load_dataset(FORMATS[suffix], data_files=path, split="train")
    except Exception as err:  # datasets raises many kinds for a malformed file
        raise ConfigError(f"data.{key}: cannot read {path} as {FORMATS[suffix]} "
                          f"({_first_line(err)})") from None
    return ds.to_list(), _class_names(ds)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def load_splits(cfg: RunConfig) -> tuple[Split, Split, Split]:
    """train / validation / test records; a lone training set is split by data.fractions and the seed."""
    import datasets

    datasets.disable_progress_bars()
    d = cfg.data
    if d.train_file is not None:
        train, names = _read_file(d.train_file, "train_file")
        if d.validation_file is not None:
            return (Split("train", d.train_file, train, names),
                    Split("validation", d.validation_file, _read_file(d.validation_file, "validation_file")[0], names),
                    Split("test", d.test_file, _read_file(d.test_file, "test_file")[0], names))
        source = d.train_file
    else:
        try:
            loaded = datasets.load_dataset(d.dataset, d.dataset_config)
        except Exception as err:
            raise ConfigError(f"data.dataset: cannot load {d.dataset!r} ({_first_line(err)})") from None
        if "train" not in loaded:
            raise ConfigError(f"data.dataset {d.dataset!r} has no 'train' split (it has {', '.join(loaded)})")
        names = _class_names(loaded["train"])
        if "validation" in loaded and "test" in loaded:
            return tuple(Split(k, f"{d.dataset}:{k}", loaded[k].to_list(), names)
                         for k in ("train", "validation", "test"))
        train, source = loaded["train"].to_list(), f"{d.dataset}:train"
    tr, va, te = split_indices(len(train), d.fractions, cfg.split_seed)
    return (Split("train", source, [train[i] for i in tr], names),
            Split("validation", source, [train[i] for i in va], names),
            Split("test", source, [train[i] for i in te], names))


def record_kind(columns: Sequence[str], d: DataConfig, source: str) -> str:
    """'chat' when the messages column is present, 'pair' for prompt/response; else a clear error."""
    if d.messages_column in columns:
        return "chat"
    if d.prompt_column in columns and d.response_column in columns:
        return "pair"
    raise ConfigError(f"{source}: expected a '{d.messages_column}' column, or '{d.prompt_column}' and "
                      f"'{d.response_column}' columns (data.messages_column / data.prompt_column / "
                      f"data.response_column); found columns: {', '.join(columns) or 'none'}")


def render(record: dict, kind: str, d: DataConfig, tokenizer, row: int, source: str) -> tuple[str, list]:
    use_chat = d.template == "chat" or (d.template == "auto" and tokenizer.chat_template is not None)
    if kind == "chat":
        messages = record[d.messages_column]
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise ConfigError(f"{source}, row {row}: column '{d.messages_column}' must be a non-empty list "
                              f"of {{role, content}} messages")
        if not any(m.get("role") == "assistant" for m in messages):
            raise ConfigError(f"{source}, row {row}: the conversation has no assistant message to learn")
    else:
        prompt, response = record[d.prompt_column], record[d.response_column]
        for col, value in ((d.prompt_column, prompt), (d.response_column, response)):
            if not isinstance(value, str):
                raise ConfigError(f"{source}, row {row}: column '{col}' must be text, got {value!r}")
        if not response.strip():
            raise ConfigError(f"{source}, row {row}: column '{d.response_column}' is empty")
        if not use_chat:
            return plain_text(prompt, response, tokenizer.eos_token or "")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    if not use_chat:
        raise ConfigError(f"{source}: chat-formatted rows need a tokenizer with a chat template "
                          f"(data.template is {d.template!r})")

    def apply(msgs, add_generation_prompt):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)

    try:
        return chat_text(messages, apply)
    except ValueError as err:
        raise ConfigError(f"{source}, row {row}: {err}") from None


def tokenize_split(split: Split, d: DataConfig, tokenizer) -> tuple[list[dict], int]:
    """Examples with input_ids/attention_mask/labels, and how many rows were dropped: truncation to
    data.max_length left no response token in them, or (with data.skip_bad_rows) the row was bad."""
    if not split.records:
        raise ConfigError(f"{split.source}: the {split.name} split is empty")
    kind = record_kind(list(split.records[0].keys()), d, split.source)
    examples, dropped = [], 0
    for row, record in enumerate(split.records):
        try:
            text, spans = render(record, kind, d, tokenizer, row, split.source)
        except ConfigError:
            if not d.skip_bad_rows:
                raise
            dropped += 1
            continue
        enc = tokenizer(text, add_special_tokens=False, truncation=True, max_length=d.max_length,
                        return_offsets_mapping=True)
        labels = mask_labels(enc["input_ids"], enc["offset_mapping"], spans)
        if all(label == IGNORE for label in labels):
            dropped += 1
            continue
        examples.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    if not examples:
        raise ConfigError(f"{split.source}: every response in the {split.name} split was truncated away by "
                          f"data.max_length = {d.max_length}; raise it")
    return examples, dropped


class MicroBatches:
    """Endless micro-batches for one rank, resumable at a global position, also on another world size.

    Epoch e shuffles the examples exactly as DistributedSampler(shuffle=True, seed=seed) does for
    epoch e. `position` counts the places of that permutation already consumed by all ranks
    together; the rest is padded (by repeating the permutation's head, as DistributedSampler does)
    to a multiple of the world size and dealt out rank by rank. On the same world size this is
    DistributedSampler's own order; on another, no example of the epoch is seen twice or skipped.
    """

    def __init__(self, examples: list, collate, rank: int, world: int, micro_batch_size: int, seed: int,
                 epoch: int = 0, position: int = 0):
        self.examples, self.collate, self.rank, self.world = examples, collate, rank, world
        self.micro_batch_size, self.seed = micro_batch_size, seed
        self.epoch, self.position = epoch, position
        self._mine: list[int] | None = None
        self._next = 0

    def _deal(self) -> None:
        import torch

        n = len(self.examples)
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = torch.randperm(n, generator=g).tolist()
        rest = order[self.position:]
        pad = -len(rest) % self.world
        rest += (order * (pad // n + 1))[:pad]
        self._mine, self._next, self._start = rest[self.rank::self.world], 0, self.position
        self._length = len(rest)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._mine is None:
            self._deal()
        b, m = self._next, self.micro_batch_size
        chunk = self._mine[b * m:(b + 1) * m]
        self._next += 1
        self.position = self._start + min(self._next * m * self.world, self._length)
        if self._next * m >= len(self._mine):  # the epoch is used up
            self.epoch, self.position, self._mine = self.epoch + 1, 0, None
        return self.collate([self.examples[i] for i in chunk])
