"""Checkpoint discovery, completeness and retention, on folders laid out like real checkpoints."""
import json
from pathlib import Path

import pytest

from trainer.config import ConfigError
from launcher.controller import resolve_resume
from trainer.checkpoints import find_checkpoints, is_complete, mark_complete, retained


def fake(root: Path, step: int, world: int = 2, ranks=None, val_loss=None, marked=True) -> Path:
    path = root / f"step_{step:07d}"
    (path / "ds").mkdir(parents=True)
    for r in range(world) if ranks is None else ranks:
        (path / f"rng_rank{r}.pt").write_bytes(b"x")
    (path / "trainer_state.json").write_text(json.dumps(
        {"step": step, "micro_step": step, "world_size": world, "zero_stage": 2, "model": "m",
         "validation": {} if val_loss is None else {"loss": val_loss}}))
    if marked:
        mark_complete(path)
    return path


def test_a_checkpoint_missing_a_rank_is_not_complete(tmp_path):
    assert is_complete(fake(tmp_path, 4))
    assert not is_complete(fake(tmp_path, 8, ranks=[0]))
    assert not is_complete(fake(tmp_path, 10, marked=False))  # a save interrupted before Ray confirmed it
    half = fake(tmp_path, 12)
    (half / "trainer_state.json").write_text("{trunc")
    assert not is_complete(half)
    assert [s for s, _ in find_checkpoints(tmp_path)] == [4]


def test_latest_complete_checkpoint_across_attempts(tmp_path):
    fake(tmp_path / "checkpoints" / "attempt-1", 4)
    latest = fake(tmp_path / "checkpoints" / "attempt-2", 10)
    fake(tmp_path / "checkpoints" / "attempt-2", 12, ranks=[1])  # interrupted while being written
    assert resolve_resume(tmp_path, "") == latest.resolve()
    assert resolve_resume(tmp_path, None) is None


def test_resume_without_checkpoints_or_from_a_bad_path_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="--resume: no complete checkpoint under"):
        resolve_resume(tmp_path, "")
    with pytest.raises(ConfigError, match="not a complete checkpoint folder"):
        resolve_resume(tmp_path, str(tmp_path))


def test_retention_keeps_last_k_plus_best_plus_protected():
    p = {s: Path(f"step_{s}") for s in (2, 4, 6, 8, 10)}
    ckpts = [(2, p[2], 3.0), (4, p[4], 1.0), (6, p[6], 2.0), (8, p[8], 2.5), (10, p[10], 2.2)]
    assert retained(ckpts, keep_last=2) == {p[8], p[10], p[4]}
    assert retained(ckpts, keep_last=1, protected={p[2]}) == {p[10], p[4], p[2]}
    assert retained([(c[0], c[1], None) for c in ckpts], keep_last=3) == {p[6], p[8], p[10]}


def test_a_failed_group_s_half_written_checkpoints_are_found_for_removal(tmp_path):
    """After a failure, the folders past the latest complete checkpoint are partial writes (a group of
    another size would replay into them beside the dead ranks' shards)."""
    from trainer.checkpoints import partial_after_latest

    root = tmp_path / "checkpoints"
    fake(root / "attempt-1", 2)
    fake(root / "attempt-1", 4, marked=False)  # being written when the node was lost
    fake(root / "attempt-1", 6, ranks=[0], marked=False)
    assert [p.name for p in partial_after_latest(root)] == ["step_0000004", "step_0000006"]
    mark_complete(root / "attempt-1" / "step_0000004")
    assert [p.name for p in partial_after_latest(root)] == ["step_0000006"]


def test_a_launch_resumed_from_an_earlier_step_has_its_half_written_checkpoints_found_too(tmp_path):
    """`--resume PATH` from step 2 of a run whose first launch went on to step 8: the second launch's
    group failed while writing step 4 (below the first launch's latest), and the group that replays it
    must not find the dead group's shards there."""
    from trainer.checkpoints import partial_after_latest

    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        fake(root / "attempt-1", step)
    fake(root / "attempt-2", 4, ranks=[1], marked=False)
    assert partial_after_latest(root) == [root / "attempt-2" / "step_0000004"]
    fake(root / "attempt-1", 10, ranks=[0], marked=False)  # the first launch's own, past its latest
    assert partial_after_latest(root) == [root / "attempt-1" / "step_0000010", root / "attempt-2" / "step_0000004"]
