"""A restart on another worker count, decided and done in the workers (trainer/checkpoints.py
universal_copy): a ZeRO-3 checkpoint of two ranks continues on one as `restart_from` (what an elastic
restart hands the workers, not only --resume), one rank's continues on two, and a conversion that
fails on rank 0 ends every rank with the same error instead of a hang. Two ranks are spawned
processes (gloo), as in every test of tests/ranks."""
import json
import os
from pathlib import Path

import pytest

from tests.helpers import tiny_config, tiny_llama
from tests.ranks.spawn import join_group, run_ranks
from trainer import checkpoints
from trainer.checkpoints import TAG, UNIVERSAL_TAG, TrainState, read_state
from trainer.config_load import from_dict
from trainer.engine import release_engine
from trainer.loop import WorkerArgs, run
from trainer.worker import evaluate_split, setup
from trainer.report import ListReporter


def _raw(tmp: Path, tokenizer_dir, max_steps: int) -> dict:
    return tiny_config(tmp, tokenizer_dir, model={"architecture": tiny_llama(2), "tokenizer": str(tokenizer_dir)},
                       deepspeed={"zero_stage": 3}, train={"max_steps": max_steps, "eval_every": 2, "save_every": 2})


def _alive_engines() -> set[int]:
    """The ids of the DeepSpeed engines and ZeRO-3 optimizers alive in this process after a full
    collection (earlier tests in the same process may have left theirs: compare before and after)."""
    import gc

    import deepspeed
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    gc.collect()
    return {id(o) for o in gc.get_objects() if isinstance(o, (deepspeed.DeepSpeedEngine, DeepSpeedZeroOptimizer_Stage3))}


def _on_rank(rank: int, port: int, jobs: list) -> None:
    """One of two ranks: run the loop for each job (config, folder, `restart_from`) in turn; write what
    it raised, if anything. A failed job ends every rank the same way, so the next one starts in step."""
    import torch.distributed as dist

    join_group(rank, 2, port)
    for raw, out, restart_from in jobs:
        try:
            # Each rank hands its shard to the same folder per step, as Ray Train merges them.
            run(from_dict(raw), ListReporter(Path(out) / "ckpt"),
                WorkerArgs(cache_dir=os.path.join(out, "cache"), restart_from=restart_from))
            dist.barrier()
        except Exception as err:
            Path(out, f"error_rank{rank}.txt").write_text(f"{type(err).__name__}: {err}")
    os._exit(0)  # the checkpoints are on disk; the native teardown is not what this test is about


def _two_ranks(jobs: list, limit_s: float = 300) -> None:
    for _, out, _ in jobs:
        Path(out).mkdir(parents=True, exist_ok=True)
    run_ranks(_on_rank, ([(raw, str(out), restart_from) for raw, out, restart_from in jobs],), limit_s=limit_s)


def _cut_short(tmp: Path, raw: dict) -> Path:
    """One rank's ZeRO-3 checkpoint whose shards were cut short."""
    bad = tmp / "one" / "step_0000002"
    (bad / TAG).mkdir(parents=True)
    (bad / TAG / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"PK\x03\x04" + bytes(100))
    (bad / TAG / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"PK\x03\x04" + bytes(100))
    state = TrainState(step=2, micro_step=2, world_size=1, zero_stage=3,
                       model=checkpoints.model_identity(from_dict(raw).model))
    (bad / checkpoints.STATE_FILE).write_text(json.dumps(state.__dict__))
    return bad


@pytest.fixture(scope="module")
def first_spawn(tmp_path_factory, tokenizer_dir):
    """One spawn of two ranks for two jobs (its start-up is most of a spawn's cost): a restart from a
    one-rank checkpoint whose conversion fails, then a fresh two-step run whose checkpoint the restarts
    below continue. Returns the folders: (the failed restart's, its bad checkpoint), the fresh run's."""
    tmp = tmp_path_factory.mktemp("restore")
    failing = _raw(tmp / "failed", tokenizer_dir, max_steps=4)
    bad = _cut_short(tmp / "failed", failing)
    _two_ranks([(failing, tmp / "failed" / "two", str(bad)), (_raw(tmp, tokenizer_dir, max_steps=2), tmp / "two", None)])
    return (tmp / "failed" / "two", bad), tmp / "two"


def test_zero3_checkpoint_of_two_ranks_restarts_on_one_and_back(first_spawn, tmp_path, tokenizer_dir, process_group):
    _, two = first_spawn
    step2 = two / "ckpt" / "step_0000002"
    saved = read_state(step2)
    assert saved.world_size == 2 and not list(two.glob("error_rank*"))

    # One rank: the conversion happens in the worker; the weights give the loss the two ranks measured.
    cfg = from_dict(_raw(tmp_path, tokenizer_dir, max_steps=4))
    args = WorkerArgs(cache_dir=str(two / "cache"), restart_from=str(step2))
    reporter = ListReporter(tmp_path / "unused")
    s = setup(cfg, args, ("validation",), reporter, args.restart_from)
    assert any("universal format" in line for line in reporter.lines), reporter.lines
    checkpoints.load(s.engine, step2, 0)
    assert evaluate_split(s, "validation")[0]["loss"] == pytest.approx(saved.validation["loss"], rel=1e-5)
    release_engine(s.engine)  # as the worker releases an engine (ZeRO-3 pins the model otherwise)
    del s
    alive = _alive_engines()
    one = ListReporter(tmp_path / "one")
    state, _ = run(cfg, one, args)  # converted once: the copy is used as it is
    # run() released its engine: nothing of it (optimizer states, ZeRO-3's parameters) outlives it into
    # the test phase (#27: DeepSpeed's module stack and its coordinator's class-level cache held both).
    assert _alive_engines() - alive == set()
    assert not any("universal format" in line for line in one.lines)
    assert any("training steps 3..4 on 1 worker(s)" in line for line in one.lines), one.lines
    assert [m.step for m, _ in one.calls] == [4] and state.step == 4 and state.world_size == 1
    assert list((step2 / UNIVERSAL_TAG / "zero").glob("*/exp_avg.pt"))  # the optimizer state travelled

    # And back: one rank's checkpoint continues on two.
    step4 = tmp_path / "one" / "step_0000004"
    _two_ranks([(_raw(tmp_path, tokenizer_dir, max_steps=6), tmp_path / "back", str(step4))])
    assert not list((tmp_path / "back").glob("error_rank*"))
    final = read_state(tmp_path / "back" / "ckpt" / "step_0000006")
    assert final.step == 6 and final.world_size == 2 and final.micro_step == 6
    assert list((step4 / UNIVERSAL_TAG / "zero").glob("*/exp_avg.pt"))


def test_a_failed_conversion_ends_every_rank_with_the_same_error(first_spawn):
    (failed, bad), _ = first_spawn
    errors = [(failed / f"error_rank{r}.txt").read_text() for r in (0, 1)]
    assert errors[0] == errors[1], errors
    assert errors[0].startswith(f"ConfigError: {bad}: converting the checkpoint to DeepSpeed's universal format "
                                f"failed"), errors[0]
    assert sorted(p.name for p in bad.iterdir()) == [TAG, checkpoints.STATE_FILE]  # nothing half-converted left
