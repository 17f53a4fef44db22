"""Data prepared once (an Arrow folder, memory-mapped, keyed by what changes it) and packing
(same loss as unpacked, no attention across examples, padding counted)."""
import random
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import DATA, tiny_config, tiny_llama
from trainer import data_cache
from trainer.config_load import from_dict
from trainer.loop import WorkerArgs, run
from trainer.model import build_model, load_tokenizer
from trainer.report import ListReporter
from trainer.tasks import causal_lm
from trainer.tasks.causal_lm import pack_rows
from trainer.data import Prepared


def _cfg(tmp: Path, tokenizer_dir, train=None, **data):
    sections = {"model": {"architecture": tiny_llama(2), "tokenizer": str(tokenizer_dir)},
                "data": {"train_file": str(DATA), "max_length": 96, **data}}
    if train:
        sections["train"] = train
    return from_dict(tiny_config(tmp, tokenizer_dir, **sections))


def test_pack_rows_keeps_every_example_whole_within_the_row_length():
    rng = random.Random(3)
    lengths = [rng.randint(1, 60) for _ in range(500)]
    rows = pack_rows(lengths, 64)
    assert sorted(i for r in rows for i in r) == list(range(500))  # each example once, none split
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    assert all(r == sorted(r) for r in rows)
    assert len(rows) <= 1.05 * sum(lengths) / 64 + 1  # nearly full rows (best-fit decreasing)


def test_second_preparation_reads_the_cache_and_what_shapes_examples_is_in_the_key(tmp_path, tokenizer_dir):
    cfg = _cfg(tmp_path, tokenizer_dir)
    tokenizer = load_tokenizer(cfg.model, None)
    logs: list[str] = []
    first = data_cache.prepare(cfg, tokenizer, tmp_path / "cache", logs.append)
    assert logs[-1].startswith("data: prepared")
    again = data_cache.prepare(cfg, tokenizer, tmp_path / "cache", logs.append)
    assert logs[-1] == f"data: cached ({first.directory})" and again.directory == first.directory
    for name, split in again.splits.items():
        assert len(split) == len(first.splits[name])
        assert split.examples([0, len(split) - 1]) == first.splits[name].examples([0, len(split) - 1])
        # memory-mapped from the prepared folder, not held in memory
        assert split.table.cache_files and all(
            Path(f["filename"]).is_relative_to(first.directory) for f in split.table.cache_files)
    # what changes an example changes the key; what does not, does not
    other = _cfg(tmp_path, tokenizer_dir, max_length=64)
    assert data_cache.cache_key(other, tokenizer) != data_cache.cache_key(cfg, tokenizer)
    same = _cfg(tmp_path, tokenizer_dir, num_proc=2, cache_dir=str(tmp_path / "x"))
    assert data_cache.cache_key(same, tokenizer) == data_cache.cache_key(cfg, tokenizer)
    edited = tmp_path / "edited.jsonl"
    shutil.copy(DATA, edited)
    with edited.open("a") as f:
        f.write('{"prompt": "One more?", "response": "Yes."}\n')
    assert data_cache.cache_key(_cfg(tmp_path, tokenizer_dir, train_file=str(edited)), tokenizer) != \
        data_cache.cache_key(_cfg(tmp_path, tokenizer_dir, train_file=str(DATA)), tokenizer)


def test_packing_gives_the_unpacked_loss_and_no_example_attends_to_another(tmp_path, tokenizer_dir):
    cfg = _cfg(tmp_path, tokenizer_dir, packing=True)
    tokenizer = load_tokenizer(cfg.model, None)
    train = data_cache.prepare(_cfg(tmp_path, tokenizer_dir), tokenizer, None).splits["train"]
    few = Prepared(train.table.select(range(16)), train.inputs)
    packed = causal_lm.pack(few, cfg)
    assert packed.packed and len(packed) < len(few) and set(packed.inputs) == {"input_ids", "labels", "position_ids"}
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, None).eval()
    model.config.use_cache = False
    collate = causal_lm.collator(tokenizer)
    unpacked_batch = collate(few.examples(range(len(few))))
    packed_batch = collate(packed.examples(range(len(packed))))
    assert packed_batch["input_ids"].numel() < unpacked_batch["input_ids"].numel()
    with torch.no_grad():
        loss_unpacked = model(**unpacked_batch).loss
        loss_packed = model(**packed_batch).loss
        assert float(loss_packed) == pytest.approx(float(loss_unpacked), abs=1e-5)
        # Perturb the first example of a row holding several: the others' logits stay as they were.
        row = next(i for i, p in enumerate(packed_batch["position_ids"]) if int((p == 0).sum()) >= 3)
        starts = (packed_batch["position_ids"][row] == 0).nonzero().flatten().tolist()
        changed = {k: v[row:row + 1].clone() for k, v in packed_batch.items()}
        changed["input_ids"][0, :starts[1]] = (changed["input_ids"][0, :starts[1]] + 7) % 400
        base = model(**{k: v[row:row + 1] for k, v in packed_batch.items()}).logits[0]
        after = model(**changed).logits[0]
    assert not torch.allclose(base[:starts[1]], after[:starts[1]])
    assert torch.allclose(base[starts[1]:], after[starts[1]:], atol=1e-5)


def test_a_packed_run_trains_on_rows_and_logs_padding(tmp_path, tokenizer_dir, process_group):
    cfg = _cfg(tmp_path, tokenizer_dir, train={"max_steps": 4, "eval_every": 4, "save_every": 4, "log_every": 1},
               packing=True)
    reporter = ListReporter(tmp_path / "ckpt")
    state, _ = run(cfg, reporter, WorkerArgs(cache_dir=str(tmp_path / "cache")))
    assert state.step == 4 and reporter.calls[-1][0].validation["loss"] > 0
    padding = reporter.scalars("train/padding_fraction")
    assert sorted(padding) == [1, 2, 3, 4] and all(0 <= v < 0.5 for v in padding.values())
    assert any("packed rows" in line for line in reporter.lines)
