"""Early stopping's counter and the best checkpoint's metric, as pure functions; the controller's
reading of an early stop; --resume of a run that stopped early is refused."""
from pathlib import Path

import pytest

from launcher.controller import Controller, check_resume
from tests.helpers import tiny_config
from tests.unit.test_checkpoints import fake
from tests.unit.test_controller import report
from trainer.checkpoints import best, find_checkpoints, read_state
from trainer.config import ConfigError, EarlyStoppingConfig
from trainer.config_load import from_dict
from trainer.early_stopping import advance, carry_over, counted, score, selection


def counts(values, **kw):
    cfg, best_value, bad, out = EarlyStoppingConfig(**kw), None, 0, []
    for v in values:
        best_value, bad = advance(best_value, bad, {"loss": v, "accuracy": v}, cfg)
        out.append(bad)
    return best_value, out


def test_the_counter_counts_evaluations_without_improvement_and_resets_on_one():
    assert counts([3.0, 2.0, 2.5, 2.4, 1.9, 2.0]) == (1.9, [0, 0, 1, 2, 0, 1])
    # min_delta: an improvement must be larger than it; an equal value is no improvement.
    assert counts([3.0, 2.95, 2.0, 2.0], min_delta=0.1) == (2.0, [0, 1, 0, 1])
    assert counts([0.5, 0.6, 0.55, 0.7], metric="accuracy", mode="max") == (0.7, [0, 0, 1, 0])


def test_a_resume_that_changes_metric_or_mode_counts_again():
    loss, accuracy = EarlyStoppingConfig(), EarlyStoppingConfig(metric="accuracy", mode="max")
    assert counted(loss) == "loss/min" and counted(accuracy) == "accuracy/max"
    assert carry_over(0.4, 2, "loss/min", loss) == (0.4, 2)
    assert carry_over(0.4, 2, None, accuracy) == (0.4, 2)  # a checkpoint from before best_of existed
    assert carry_over(0.4, 2, "loss/min", accuracy) == (None, 0)  # a best loss is no bar for an accuracy
    assert carry_over(0.4, 2, "loss/max", loss) == (None, 0)
    # Counting again: the first evaluation after the resume sets the new metric's best.
    assert advance(*carry_over(0.4, 2, "loss/min", accuracy), {"accuracy": 0.3}, accuracy) == (0.3, 0)


def test_a_metric_the_validation_lacks_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"train.early_stopping.metric is 'f1', but the validation reports loss"):
        advance(None, 0, {"loss": 1.0}, EarlyStoppingConfig(metric="f1"))


def test_the_best_checkpoint_is_chosen_by_early_stopping_metric_and_mode(tmp_path):
    cfg = from_dict(tiny_config(tmp_path, tmp_path))
    assert selection(cfg) == ("loss", "min")
    cls = from_dict(tiny_config(tmp_path, tmp_path, model={"task": "sequence_classification"},
                                train={"early_stopping": {"metric": "accuracy", "mode": "max"}}))
    assert selection(cls) == ("accuracy", "max")
    assert score({"accuracy": 0.8}, "accuracy", "max") == -0.8 and score({"loss": 1.0}, "accuracy", "max") is None
    p = {s: Path(f"step_{s}") for s in (2, 4, 6)}
    accuracies = {2: 0.5, 4: 0.9, 6: 0.9}
    assert best([(s, p[s], score({"accuracy": a}, "accuracy", "max")) for s, a in accuracies.items()]) == p[6]
    assert best([(s, p[s], score({"accuracy": a}, "loss", "min")) for s, a in accuracies.items()]) is None


def test_unmarked_checkpoints_count_only_under_the_workers_own_launch(tmp_path):
    fake(tmp_path / "attempt-1", 2, val_loss=1.0, marked=False)  # an earlier launch's interrupted save
    fake(tmp_path / "attempt-2", 4, val_loss=2.0)
    fake(tmp_path / "attempt-2", 6, val_loss=1.5, marked=False)  # this launch's last, not yet marked
    assert [s for s, _ in find_checkpoints(tmp_path)] == [4]
    assert [s for s, _ in find_checkpoints(tmp_path, written_under=tmp_path / "attempt-2")] == [4, 6]


def test_the_controller_records_the_early_stop_and_tracks_the_best_by_the_metric(tmp_path, capsys):
    cfg = from_dict(tiny_config(tmp_path, tmp_path, model={"task": "sequence_classification"},
                                train={"early_stopping": {"metric": "accuracy", "mode": "max", "patience": 1}}))
    ctl = Controller(cfg, tmp_path)
    ctl.receive(report(4, validation={"loss": 2.0, "accuracy": 0.6}))
    ctl.receive(report(8, validation={"loss": 1.5, "accuracy": 0.5}, final=True, stopped_early=True))
    assert ctl.best.step == 4  # the lower loss at step 8 does not count: accuracy decides
    assert ctl.stopped_early_at == 8 and ctl.trained and not ctl.stopped
    assert "[sft] early stopping at step 8: validation accuracy has not improved by more than 0 for 1 evaluation(s) " \
           "(best 0.6 at step 4); checkpointed, the test evaluation comes next" in capsys.readouterr().out


def test_resume_of_a_run_that_stopped_early_is_refused_once_it_was_tested(tmp_path):
    path = fake(tmp_path, 6)
    state = read_state(path).__dict__ | {"stopped_early": True}
    (path / "trainer_state.json").write_text(__import__("json").dumps(state))
    cfg = from_dict(tiny_config(tmp_path, tmp_path))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ConfigError, match="the checkpoint is of model 'm'"):  # past the early stop: its test is still to run
        check_resume(path, cfg, plan=None, out=out)
    (out / "test_metrics.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"--resume .*step_0000006: the run stopped early at step 6 "
                                          r"\(train.early_stopping"):
        check_resume(path, cfg, plan=None, out=out)
