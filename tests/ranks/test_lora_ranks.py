"""A lean LoRA checkpoint (adapters and their optimizer state only) of two spawned ranks (gloo)
continues on one: the LoRA half of tests/ranks/test_restore.py."""
import dataclasses
import os
from pathlib import Path

import pytest

from tests.loop.test_lora import _cfg
from tests.ranks.spawn import join_group, run_ranks
from trainer.checkpoints import TAG, read_state
from trainer.config_load import from_dict, to_dict
from trainer.loop import WorkerArgs, run
from trainer.report import ListReporter


def _train_on_rank(rank: int, port: int, raw: dict, out: str) -> None:
    import torch.distributed as dist

    join_group(rank, 2, port)
    # Each rank hands its shard to the same folder per step, as Ray Train merges them.
    run(from_dict(raw), ListReporter(Path(out) / "ckpt"), WorkerArgs(cache_dir=os.path.join(out, "cache")))
    dist.barrier()
    os._exit(0)  # the checkpoints are on disk; the native teardown is not what this test is about


def test_a_lora_checkpoint_of_two_ranks_continues_on_one(tmp_path, tokenizer_dir, process_group):
    """World-size change of a lean LoRA checkpoint (adapters + their optimizer state only): DeepSpeed's
    universal conversion (in the worker), then one rank reads it: the adapters give the validation loss
    the two ranks measured at that step, and training goes on with the converted optimizer state."""
    from trainer import checkpoints, loop
    from trainer.worker import evaluate_split, setup

    cfg = _cfg(tmp_path, tokenizer_dir, stage=2, train={"max_steps": 4, "eval_every": 2, "save_every": 2,
                                                        "micro_batch_size": 8})
    run_ranks(_train_on_rank, (to_dict(cfg), str(tmp_path)))
    step2 = tmp_path / "ckpt" / "step_0000002"
    saved = read_state(step2)
    assert saved.world_size == 2 and saved.lean and sorted(p.name for p in (step2 / TAG).glob("zero_pp_rank_*")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    one = dataclasses.replace(cfg, scaling=dataclasses.replace(cfg.scaling, workers_per_node=1))
    args = WorkerArgs(cache_dir=str(tmp_path / "cache"), resume_from=str(step2))
    s = setup(one, args, ("validation",), ListReporter(tmp_path / "unused"), args.resume_from)
    assert list((step2 / checkpoints.UNIVERSAL_TAG / "zero").glob("*lora_A*/exp_avg.pt"))
    checkpoints.load(s.engine, step2, 0)
    assert evaluate_split(s, "validation")[0]["loss"] == pytest.approx(saved.validation["loss"], rel=1e-5)
    s.engine.destroy()
    state, _ = loop.run(one, ListReporter(tmp_path / "one"), args)
    assert state.step == 4 and state.world_size == 1
