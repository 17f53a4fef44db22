"""The worker loop in one process (gloo, fp32, world size 1) on tiny real models."""
from pathlib import Path

import pytest
import torch

from trainer.config_load import from_dict
from tests.helpers import save_pretrained_llama, tiny_config, tiny_llama
from trainer.checkpoints import TAG, find_checkpoints, read_state
from trainer.loop import WorkerArgs, run
from trainer.model import build_model
from trainer.report import ListReporter


def _run(tmp: Path, tokenizer_dir, **sections):
    cfg = from_dict(tiny_config(tmp, tokenizer_dir, **sections))
    reporter = ListReporter(tmp / "ckpt")
    state, _ = run(cfg, reporter, WorkerArgs(cache_dir=str(tmp / "cache")))
    return cfg, reporter, state


@pytest.mark.parametrize("stage", [1, 2])
def test_frozen_parameters_are_bit_identical_and_trainable_ones_change(tmp_path, tokenizer_dir, process_group, stage):
    cfg, reporter, state = _run(
        tmp_path, tokenizer_dir, model={"architecture": tiny_llama(3), "tokenizer": str(tokenizer_dir)},
        finetune={"mode": "local", "train_last_layers": 1, "train_head": True},
        deepspeed={"zero_stage": stage}, train={"max_steps": 6, "eval_every": 3, "save_every": 6})
    assert state.step == 6
    torch.manual_seed(cfg.seed)
    initial = build_model(cfg.model, None).state_dict()
    final_ckpt = reporter.calls[-1][1]
    saved = torch.load(final_ckpt / TAG / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    trains = lambda n: n.startswith("model.layers.2.") or n == "lm_head.weight"
    changed = {n for n in initial if not torch.equal(initial[n], saved[n].float())}
    assert changed == {n for n in initial if trains(n) and "rotary" not in n}


def test_same_seed_same_losses_and_validation_decreases(tmp_path, tokenizer_dir, process_group):
    _, a, _ = _run(tmp_path / "a", tokenizer_dir)
    _, b, _ = _run(tmp_path / "b", tokenizer_dir)
    losses = lambda r: [(m.step, m.train_loss, m.validation["loss"]) for m, _ in r.calls]
    assert losses(a) == losses(b)
    assert [s for s, *_ in losses(a)] == [4, 8, 12]
    assert losses(a)[-1][2] < losses(a)[0][2]


def test_the_task_module_defines_the_training_objective(tmp_path, tokenizer_dir, process_group, monkeypatch):
    """The loop trains on the task's `loss(model, batch, impl, cfg)` (impl: train.loss_impl resolved; auto is
    standard for logits this small): an objective that is zero everywhere leaves
    the weights (so the validation loss) where they started, while the model's own loss goes down."""
    from trainer.tasks import causal_lm, common

    seen = []

    def flat(model, batch, impl, cfg):
        seen.append((type(model).__name__, sorted(batch), impl.name))
        return 0.0 * common.model_loss(model, batch)

    monkeypatch.setattr(causal_lm, "loss", flat)
    _, reporter, _ = _run(tmp_path, tokenizer_dir, train={"max_steps": 8, "eval_every": 4, "save_every": 8},
                          optim={"weight_decay": 0.0})  # decay alone would move the weights
    validation = [m.validation["loss"] for m, _ in reporter.calls]
    assert len(validation) == 2 and validation[0] == pytest.approx(validation[1], abs=1e-6)
    assert all(m.train_loss == 0 for m, _ in reporter.calls)
    assert len(seen) == 8 and seen[0] == ("DeepSpeedEngine", ["attention_mask", "input_ids", "labels"], "standard")


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_continues_with_identical_losses(tmp_path, tokenizer_dir, process_group, stage):
    cfg, full, _ = _run(tmp_path / "full", tokenizer_dir, deepspeed={"zero_stage": stage},
                        model={"architecture": tiny_llama(2), "tokenizer": str(tokenizer_dir)})
    step4 = full.calls[0][1]
    assert read_state(step4).step == 4 and read_state(step4).micro_step == 4
    resumed = ListReporter(tmp_path / "resumed")
    state, _ = run(cfg, resumed, WorkerArgs(cache_dir=str(tmp_path / "cache"), resume_from=str(step4)))
    assert state.step == 12
    tail = lambda r: [(m.step, round(m.train_loss, 6), round(m.validation["loss"], 6)) for m, _ in r.calls]
    assert tail(resumed) == tail(full)[1:]
    assert [s for s, _ in find_checkpoints(tmp_path / "resumed")] == [8, 12]
    # every tracked step after the checkpoint: the same training loss as the uninterrupted run
    new, old = resumed.scalars("train/loss"), full.scalars("train/loss")
    assert sorted(new) == list(range(5, 13))
    assert [new[s] for s in new] == pytest.approx([old[s] for s in new], abs=1e-6)


def test_grad_norm_is_logged_on_every_stage_and_stage_0_matches_zero(tmp_path, tokenizer_dir, process_group):
    """DeepSpeed computes no global norm on stage 0; the loop's own must equal what ZeRO reports."""
    norms = {}
    for stage in (0, 2):
        _, reporter, _ = _run(tmp_path / f"s{stage}", tokenizer_dir, deepspeed={"zero_stage": stage},
                              train={"max_steps": 3, "eval_every": 3, "save_every": 3})
        norms[stage] = reporter.scalars("train/grad_norm")
    assert sorted(norms[0]) == [1, 2, 3] and all(v > 0 for v in norms[0].values())
    assert [norms[0][s] for s in (1, 2, 3)] == pytest.approx([norms[2][s] for s in (1, 2, 3)], rel=1e-4)


# Stage 1 on a model whose output head is tied to the (frozen) embeddings, as SmolLM2's is: the alias
# lm_head.weight must not be written either.
@pytest.mark.parametrize("stage, tied", [(1, True), (3, False)])
def test_lean_checkpoints_hold_only_the_trainable_part_and_resume_exactly(tmp_path, tokenizer_dir, process_group,
                                                                          stage, tied):
    from trainer.checkpoints import load, size_bytes
    from trainer.worker import evaluate_split, setup

    pretrained_llama = save_pretrained_llama(tmp_path / "pretrained", tokenizer_dir, tied)
    local = {"model": {"name_or_path": str(pretrained_llama), "architecture": None, "tokenizer": None},
             "finetune": {"mode": "local", "train_last_layers": 1}, "deepspeed": {"zero_stage": stage}}
    cfg, full, _ = _run(tmp_path / "full", tokenizer_dir, **local)
    step4, final = full.calls[0][1], full.calls[-1][1]
    assert read_state(step4).lean
    if stage == 1:  # the module states hold the trainable block only
        saved = torch.load(step4 / TAG / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        assert saved and all(n.startswith("model.layers.2.") for n in saved)
    _, everything, _ = _run(tmp_path / "global", tokenizer_dir, **{**local, "finetune": {"mode": "global"}})
    assert size_bytes(step4) < 0.6 * size_bytes(everything.calls[0][1])
    resumed = ListReporter(tmp_path / "resumed")
    run(cfg, resumed, WorkerArgs(cache_dir=str(tmp_path / "cache"), resume_from=str(step4)))
    tail = lambda r: [(m.step, round(m.train_loss, 6), round(m.validation["loss"], 6)) for m, _ in r.calls]
    assert tail(resumed) == tail(full)[1:]
    # base weights + the lean final checkpoint = the trained model: the same validation loss as in training
    s = setup(cfg, WorkerArgs(cache_dir=str(tmp_path / "cache")), ("validation",), ListReporter())
    load(s.engine, final, 0, load_optimizer=False)
    assert evaluate_split(s, "validation")[0]["loss"] == pytest.approx(full.calls[-1][0].validation["loss"], rel=1e-5)


@pytest.mark.parametrize("finetune, stage", [({"mode": "global"}, 2),
                                             ({"mode": "local", "train_last_layers": 1}, 3)])
def test_gradient_checkpointing_gives_the_same_losses(tmp_path, tokenizer_dir, process_group, finetune, stage):
    """Recomputed activations (dropout RNG restored) on every stage, with frozen blocks too."""
    common = {"model": {"architecture": tiny_llama(2), "tokenizer": str(tokenizer_dir)}, "finetune": finetune,
              "deepspeed": {"zero_stage": stage}}
    losses = {}
    for on in (False, True):
        _, r, _ = _run(tmp_path / str(on), tokenizer_dir, **common,
                       train={"max_steps": 4, "eval_every": 2, "save_every": 4, "gradient_checkpointing": on})
        losses[on] = [x for m, _ in r.calls for x in (m.train_loss, m.validation["loss"])]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_attention_implementations_agree(tmp_path, tokenizer_dir, process_group):
    losses = {}
    for impl in ("eager", "sdpa"):
        _, r, _ = _run(tmp_path / impl, tokenizer_dir,
                       model={"architecture": tiny_llama(2), "tokenizer": str(tokenizer_dir), "attn_implementation": impl},
                       train={"max_steps": 3, "eval_every": 3, "save_every": 3})
        losses[impl] = [x for m, _ in r.calls for x in (m.train_loss, m.validation["loss"])]
    assert losses["eager"] == pytest.approx(losses["sdpa"], rel=1e-4)
