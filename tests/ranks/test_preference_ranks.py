"""model.task: preference on two spawned ZeRO-3 ranks (gloo): the distributed reference pass stores
what one worker computes, and the evaluation is exact across uneven shards."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.loop.test_preference_loop import preference_config
from tests.ranks.spawn import join_group, run_ranks
from trainer.config_load import from_dict
from trainer.loop import WorkerArgs, run
from trainer.reference import location
from trainer.report import ListReporter


def _run_and_write(raw: dict, out: str, rank: int) -> None:
    cfg, args = from_dict(raw), WorkerArgs(cache_dir=os.path.join(out, "cache"))
    reporter = ListReporter(Path(out) / "ckpt" / str(rank))
    run(cfg, reporter, args)
    if rank == 0:
        folder = location(cfg, args)
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump({"validation": [m.validation for m, _ in reporter.calls],
                       "reference": {s: np.load(folder / f"{s}.npy").tolist() for s in ("train", "validation", "test")}},
                      f)


def _rank(rank: int, port: int, raw: dict, out: str) -> None:
    import torch.distributed as dist

    join_group(rank, 2, port)
    _run_and_write(raw, out, rank)
    dist.destroy_process_group()


def test_two_zero3_ranks_give_one_workers_reference_and_metrics(tmp_path, tokenizer_dir, process_group):
    """The same global batch (2 x 4, or 1 x 8 in this process) under ZeRO-3: the distributed reference
    pass stores the values one worker computes, and the validation metrics (35 pairs: uneven shards) agree."""
    base = preference_config(tmp_path, tokenizer_dir, deepspeed={"zero_stage": 3},
                             train={"max_steps": 4, "eval_every": 2, "save_every": 4, "micro_batch_size": 4},
                             scaling={"workers_per_node": 2})
    one = {**base, "train": {**base["train"], "micro_batch_size": 8}, "scaling": {**base["scaling"], "workers_per_node": 1}}
    (tmp_path / "world2").mkdir()
    run_ranks(_rank, (base, str(tmp_path / "world2")))
    (tmp_path / "world1").mkdir()
    _run_and_write(one, str(tmp_path / "world1"), 0)
    two_ranks, one_rank = (json.loads((tmp_path / w / "result.json").read_text()) for w in ("world2", "world1"))
    for split in ("train", "validation", "test"):
        assert np.allclose(two_ranks["reference"][split], one_rank["reference"][split], atol=1e-5)
    assert len(two_ranks["validation"]) == 2
    for a, b in zip(two_ranks["validation"], one_rank["validation"]):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], abs=1e-4), key
