"""Early stopping in the worker loop (one process, tiny model): it fires when validation gets worse,
not while it improves; the patience counter lives in the checkpoint; test.checkpoint: best tests
the best checkpoint by validation."""
from pathlib import Path

from tests.helpers import tiny_config
from trainer.checkpoints import dir_name, read_state
from trainer.config_load import from_dict, to_dict
from trainer.loop import WorkerArgs, fine_tune, run
from trainer.messages import TestResult
from trainer.report import ListReporter

PATIENCE_2 = {"early_stopping": {"metric": "loss", "mode": "min", "patience": 2}}


def config(tmp: Path, tokenizer_dir, lr: float, **sections):
    return from_dict(tiny_config(tmp, tokenizer_dir, optim={"lr": lr, "warmup_steps": 0, "scheduler": "constant"},
                                 train={"max_steps": 12, "eval_every": 2, "save_every": 2, **PATIENCE_2}, **sections))


def test_a_diverging_run_stops_early_checkpoints_tests_the_best_and_a_resume_keeps_the_patience(
        tmp_path, tokenizer_dir, process_group):
    # lr 1.0 makes validation worse after the first evaluation (step 2): patience 2 runs out at step 6.
    cfg = config(tmp_path, tokenizer_dir, 1.0, test={"checkpoint": "best"})
    root = tmp_path / "launch" / "attempt-1"
    reporter = ListReporter(root)
    fine_tune(cfg, reporter, WorkerArgs(cache_dir=str(tmp_path / "cache"), checkpoint_root=str(root)))
    trained = [m for m, _ in reporter.calls if not isinstance(m, TestResult)]
    assert [m.step for m in trained] == [2, 4, 6]
    assert [m.stopped_early for m in trained] == [False, False, True] and trained[-1].final
    assert not any(m.stopped for m in trained)
    losses = [m.validation["loss"] for m in trained]
    assert losses[0] < losses[1] < losses[2]
    stopped = read_state(root / dir_name(6))
    assert stopped.stopped_early and stopped.bad_evaluations == 2 and stopped.best_metric == losses[0]
    # test.checkpoint: best: the test evaluation (and the export) read step 2, not the final step 6.
    test = reporter.calls[-1][0]
    assert isinstance(test, TestResult) and test.step == 2 and test.checkpoint == str(root / dir_name(2))

    # Resumed from step 4 (one evaluation without improvement so far), it stops at step 6 again:
    # with the counter reset it would only start counting there.
    at4 = root / dir_name(4)
    assert read_state(at4).bad_evaluations == 1 and not read_state(at4).stopped_early
    resumed = ListReporter(tmp_path / "resumed")
    state, stopped_on_request = run(cfg, resumed, WorkerArgs(cache_dir=str(tmp_path / "cache"), resume_from=str(at4)))
    assert state.step == 6 and state.stopped_early and not stopped_on_request
    assert [(m.step, m.stopped_early) for m, _ in resumed.calls] == [(6, True)]

    # Resumed from step 4 with another metric: the saved best loss is no bar for perplexity, so
    # patience starts again: step 6 (where the loss's count ran out) is the new metric's first best.
    assert read_state(at4).best_of == "loss/min"
    other = from_dict({**to_dict(cfg), "train": {**to_dict(cfg)["train"], "early_stopping": {
        "metric": "perplexity", "mode": "min", "patience": 2}}})
    recounted = ListReporter(tmp_path / "recounted")
    run(other, recounted, WorkerArgs(cache_dir=str(tmp_path / "cache"), resume_from=str(at4)))
    assert any("early stopping now counts perplexity/min, not loss/min" in line for line in recounted.lines)
    assert recounted.calls[0][0].step == 6 and not recounted.calls[0][0].stopped_early
    at6 = read_state(tmp_path / "recounted" / dir_name(6))
    assert at6.best_of == "perplexity/min" and at6.bad_evaluations == 0
    assert at6.best_metric == recounted.calls[0][0].validation["perplexity"]


def test_an_improving_run_is_not_stopped(tmp_path, tokenizer_dir, process_group):
    cfg = config(tmp_path, tokenizer_dir, 3e-3)
    reporter = ListReporter(tmp_path / "ckpt")
    state, _ = run(cfg, reporter, WorkerArgs(cache_dir=str(tmp_path / "cache")))
    assert state.step == 12 and not state.stopped_early and state.bad_evaluations == 0
    assert [m.step for m, _ in reporter.calls] == [2, 4, 6, 8, 10, 12]
    assert not any(m.stopped_early for m, _ in reporter.calls) and reporter.calls[-1][0].final
