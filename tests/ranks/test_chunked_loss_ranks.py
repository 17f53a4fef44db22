"""train.loss_impl: chunked on two spawned ZeRO-3 ranks (gloo) with different batches: the ranks'
collectives stay in step and the losses are the standard objective's (#26)."""
from pathlib import Path

import pytest

from tests.helpers import tiny_config
from tests.ranks.spawn import join_group, run_ranks
from trainer import chunked_loss
from trainer.loop import WorkerArgs, run
from trainer.report import ListReporter


def _rank(rank: int, port: int, raws: dict, out: str) -> None:
    """Both objectives in turn on the same two ranks (one spawn: the start-up is most of the time)."""
    import json

    import torch.distributed as dist

    from trainer.config_load import from_dict

    join_group(rank, 2, port)
    chunked_loss.CHUNK_BYTES = 400 * 4 * 40  # 20 chunks per micro-batch, as in the one-process tests
    for impl, raw in raws.items():
        reporter = ListReporter(Path(out) / impl / f"ckpt{rank}")
        run(from_dict(raw), reporter, WorkerArgs(cache_dir=str(Path(out) / impl / "cache")))
        with open(Path(out) / impl / f"rank{rank}.json", "w") as f:
            json.dump({"train": reporter.scalars("train/loss"),
                       "validation": [m.validation for m, _ in reporter.calls]}, f)
    dist.destroy_process_group()


def test_two_zero3_ranks_with_different_batches_give_the_standard_losses(tmp_path, tokenizer_dir):
    """Each rank's micro-batches hold different numbers of labelled tokens, and under ZeRO-3 every
    call of the head all-gathers its (tied) weight: the fixed chunk count keeps the ranks' collectives
    in step (no hang), and the losses are standard's. Validation runs synced (module hooks gather)."""
    import json

    raws = {impl: tiny_config(tmp_path / impl, tokenizer_dir, deepspeed={"zero_stage": 3},
                              train={"max_steps": 3, "eval_every": 3, "save_every": 3, "loss_impl": impl},
                              eval={"generate": {"num_examples": 0, "test": False, "zero3": "synced"}})
            for impl in ("standard", "chunked")}
    for impl in raws:
        (tmp_path / impl).mkdir(exist_ok=True)
    run_ranks(_rank, (raws, str(tmp_path)))  # a collective out of step would hang: it fails after the limit
    results = {impl: [json.loads((tmp_path / impl / f"rank{r}.json").read_text()) for r in range(2)] for impl in raws}
    # the loss every step (rank 0 tracks it: the mean over both ranks), validation on both ranks
    assert len(results["chunked"][0]["train"]) == 3
    assert results["chunked"][0]["train"] == pytest.approx(results["standard"][0]["train"], rel=1e-5, abs=1e-6)
    for standard, chunked in zip(results["standard"], results["chunked"]):
        for got, want in zip(chunked["validation"], standard["validation"], strict=True):
            assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
