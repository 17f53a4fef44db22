"""train.loss_impl: chunked through the worker loop in one process (#26): the same seed and data give
the standard objective's losses, validation metrics and weights (fp32, 1e-5) on ZeRO 0, 2 and 3, with
packing, LoRA and a head tied to the input embedding (GPT-2), the logits a few positions at a time.
Two ZeRO-3 ranks: tests/ranks/test_chunked_loss_ranks.py."""
from pathlib import Path

import pytest
import torch

from tests.helpers import save_pretrained_llama, tiny_config, tiny_llama
from trainer import chunked_loss, loop
from trainer.config_load import from_dict
from trainer.loop import WorkerArgs, run
from trainer.report import ListReporter


def _run(tmp: Path, tokenizer_dir, impl: str, monkeypatch, **sections):
    cfg = from_dict(tiny_config(tmp, tokenizer_dir, train={"max_steps": 4, "eval_every": 2, "save_every": 4,
                                                           "loss_impl": impl, "log_every": 1}, **sections))
    built = []

    def kept(*args, **kwargs):  # the worker's engine, to read its weights after the run
        built.append(loop_setup(*args, **kwargs))
        return built[-1]

    loop_setup = loop.setup
    monkeypatch.setattr(loop, "setup", kept)
    reporter = ListReporter(tmp / "ckpt")
    run(cfg, reporter, WorkerArgs(cache_dir=str(tmp / "cache")))
    monkeypatch.setattr(loop, "setup", loop_setup)
    s = built[0]
    assert s.shard.loss_impl.name == impl
    engine = s.engine
    params = dict(engine.module.named_parameters())
    if cfg.deepspeed.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values())):
            weights = {n: p.detach().clone() for n, p in params.items()}
    else:
        weights = {n: p.detach().clone() for n, p in params.items()}
    return reporter, weights


def _llama(tmp: Path, tokenizer_dir) -> dict:
    return {"architecture": tiny_llama(2), "tokenizer": str(tokenizer_dir)}


CASES = {
    "zero0-tied": lambda tmp, tok: dict(deepspeed={"zero_stage": 0}),  # GPT-2 ties lm_head to wte
    "zero3-tied": lambda tmp, tok: dict(deepspeed={"zero_stage": 3}),
    "zero3-packed": lambda tmp, tok: dict(deepspeed={"zero_stage": 3}, model=_llama(tmp, tok),
                                          data={"packing": True}),
    "zero2-lora": lambda tmp, tok: dict(
        deepspeed={"zero_stage": 2}, optim={"lr": 1e-2},
        model={"name_or_path": str(save_pretrained_llama(tmp / "pretrained", tok, tied=True)),
               "architecture": None, "tokenizer": None},
        finetune={"mode": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_chunked_gives_the_standard_losses_and_weights(tmp_path, tokenizer_dir, process_group, monkeypatch, case):
    # 40 positions per chunk (vocabulary 400): 8 x 96 / 40 -> 20 chunks per micro-batch
    monkeypatch.setattr(chunked_loss, "CHUNK_BYTES", 400 * 4 * 40)
    sections = CASES[case](tmp_path, tokenizer_dir)
    standard, want = _run(tmp_path / "standard", tokenizer_dir, "standard", monkeypatch, **sections)
    chunked, got = _run(tmp_path / "chunked", tokenizer_dir, "chunked", monkeypatch, **sections)
    assert chunked.scalars("train/loss") == pytest.approx(standard.scalars("train/loss"), rel=1e-5, abs=1e-6)
    assert len(chunked.scalars("train/loss")) == 4
    for (m, _), (n, _) in zip(chunked.calls, standard.calls):
        assert m.validation == pytest.approx(n.validation, rel=1e-5, abs=1e-6)
    assert want.keys() == got.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-5, msg=n)
    assert len(set(standard.scalars("train/loss").values())) > 1  # the weights compared are ones that trained


