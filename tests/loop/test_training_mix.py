"""A training mix of two weighted sources through the real preparation and the worker loop: each
source prepared on its own, validation and test from the first, an epoch drawn 3:1, the plan's
lines, and a resumed run that continues at the same place."""
from dataclasses import replace
from pathlib import Path

import pytest

from launcher.plan import Plan, describe, mix_shares
from tests.helpers import DATA, shouted_copy, tiny_config, tiny_llama
from trainer import data_cache
from trainer.checkpoints import read_state
from trainer.config import EarlyStoppingConfig
from trainer.config_load import from_dict, to_dict
from trainer.data import micro_batches
from trainer.loop import WorkerArgs, run
from trainer.model import load_tokenizer
from trainer.report import ListReporter


def mix_config(tmp: Path, tokenizer_dir, weights=(3, 1), **train):
    sources = [{"path": str(DATA), "weight": weights[0]}, {"path": shouted_copy(tmp), "weight": weights[1]}]
    return from_dict(tiny_config(tmp, tokenizer_dir, model={"architecture": tiny_llama(2), "tokenizer": str(tokenizer_dir)},
                                 data={"train_file": sources, "max_length": 96},
                                 train={"max_steps": 6, "eval_every": 3, "save_every": 3, **train}))


def test_a_mix_is_prepared_per_source_and_an_epoch_draws_by_weight(tmp_path, tokenizer_dir):
    cfg = mix_config(tmp_path, tokenizer_dir)
    tokenizer = load_tokenizer(cfg.model, None)
    prepared = data_cache.prepare(cfg, tokenizer, tmp_path / "cache", lambda line: None)
    single = data_cache.prepare(from_dict(tiny_config(tmp_path, tokenizer_dir)), tokenizer, None)
    train = prepared.splits["train"]
    # validation and test: the first source's split (as if it were alone); its train part + all of the second
    assert len(prepared.splits["validation"]) == len(single.splits["validation"])
    assert train.parts == (len(single.splits["train"]), 80) and len(train) == sum(train.parts)
    order = micro_batches(cfg, train, 0, 1, 0, 0).order(0)
    assert len(order) == len(train)
    assert sum(1 for i in order if i < train.parts[0]) / len(order) == pytest.approx(0.75, abs=0.05)
    # the sources are in the cache key, their weights not (they only order the draws)
    assert data_cache.cache_key(mix_config(tmp_path, tokenizer_dir, (1, 1)), tokenizer) == \
        data_cache.cache_key(cfg, tokenizer)
    single = from_dict({**to_dict(cfg), "data": {**to_dict(cfg)["data"], "train_file": str(DATA)}})
    assert data_cache.cache_key(single, tokenizer) != data_cache.cache_key(cfg, tokenizer)
    # the startup summary: each source's rows and share
    shares = mix_shares(cfg, train.parts)
    assert [(Path(p).name, n) for p, _, n, _ in shares] == [("sft_tiny.jsonl", train.parts[0]), ("shouted.jsonl", 80)]
    assert [s for *_, s in shares] == pytest.approx([274 / 365, 91 / 365])  # 365 draws: 273.75 and 91.25, rounded
    plan = Plan(2, 8, 16, {"train": len(train)}, 6, 1, 1, "", None, sources=shares)
    assert "training mix: shouted.jsonl 80 rows, weight 1: 24.9% of each epoch's draws" in describe(plan, cfg)
    assert "early stopping" not in describe(plan, cfg) and "test and export" not in describe(plan, cfg)
    stopping = replace(cfg, train=replace(cfg.train, early_stopping=EarlyStoppingConfig(patience=2)))
    assert "early stopping: validation loss (min), patience 2 evaluation(s), min_delta 0" in describe(plan, stopping)


def test_a_mix_resumes_at_the_same_place(tmp_path, tokenizer_dir, process_group):
    cfg = mix_config(tmp_path, tokenizer_dir)
    full = ListReporter(tmp_path / "full")
    run(cfg, full, WorkerArgs(cache_dir=str(tmp_path / "cache")))
    step3 = full.calls[0][1]
    assert read_state(step3).position == 3 * 8  # three micro-batches of 8 into the mixed epoch
    resumed = ListReporter(tmp_path / "resumed")
    run(cfg, resumed, WorkerArgs(cache_dir=str(tmp_path / "cache"), resume_from=str(step3)))
    tail = lambda r: [(m.step, round(m.train_loss, 6), round(m.validation["loss"], 6)) for m, _ in r.calls]
    assert tail(resumed) == tail(full)[1:]
