"""The controller's reading of worker messages, without Ray: failures that repeat end the run,
process deaths and failures after progress are restarted."""
import pytest

from launcher.controller import Controller, RepeatedFailure
from tests.helpers import tiny_config
from trainer.config_load import from_dict
from trainer.messages import Received, TrainReport, Where, WorkerFailure


@pytest.fixture
def ctl(tmp_path):
    return Controller(from_dict(tiny_config(tmp_path, tmp_path)), tmp_path)


def report(step, **kw):
    where = Where("n", "127.0.0.1", "h", 1)
    return Received((TrainReport(step, 1.0, **kw),) * 2, (where, where))


def failure(*errors):
    return WorkerFailure(dict(enumerate(errors)), {r: f"Traceback ...\n{e}" for r, e in enumerate(errors)})


def test_the_same_error_again_with_no_progress_ends_the_run(ctl):
    ctl.receive(report(4))
    ctl.receive(failure("IndexError: index out of range in self", "IndexError: index out of range in self"))
    with pytest.raises(RepeatedFailure, match="the same error twice after step 4"):
        ctl.receive(failure("IndexError: index out of range in self"))  # one rank's report is enough
    assert "IndexError" in ctl.failure_log.read_text()


def test_failures_with_progress_between_or_other_errors_are_restarted(ctl):
    ctl.receive(failure("ActorDiedError: worker pid=101 died"))
    ctl.receive(failure("ActorDiedError: worker pid=202 died"))  # a process death differs every time
    ctl.receive(report(8))
    ctl.receive(failure("ActorDiedError: worker pid=202 died"))  # same text, but steps were made
    assert ctl.restarts == 3


def test_validation_history_keeps_one_entry_per_step_and_the_best(ctl):
    ctl.receive(report(4, validation={"loss": 2.0}))
    ctl.receive(report(8, validation={"loss": 1.5}))
    ctl.receive(report(8, validation={"loss": 1.6}))  # replayed after a restart
    assert [e.step for e in ctl.history] == [4, 8] and ctl.history[-1].metrics["loss"] == 1.6
    assert ctl.best.step == 8 and ctl.best.metrics["loss"] == 1.5
    ctl.receive(report(12, final=True))
    assert ctl.trained and ctl.last_step == 12


def test_every_metric_goes_to_the_run_tracker_once_per_step_with_what_the_run_went_on_with(tmp_path):
    """The controller is the run's one writer: per-step metrics from the queue, val/* from the reports;
    a restarted group's replay (a step at or below the last) rewinds, a launch from a checkpoint too,
    and TensorBoard shows each step once with the values of the run that went on."""
    from launcher.tracking import TensorBoardTracker
    from tests.e2e.common import scalars, texts
    from trainer.messages import StepMetrics

    cfg, board = from_dict(tiny_config(tmp_path, tmp_path)), tmp_path / "tensorboard"
    ctl = Controller(cfg, tmp_path, tracker=TensorBoardTracker(board))
    for step in range(1, 11):
        ctl.receive(StepMetrics(step, {"train/loss": float(step)},
                                {"val/generations": f"| table {step} |"} if step == 4 else {}))
    ctl.receive(report(4, validation={"loss": 2.0}))
    for step in range(5, 9):  # a restart from the checkpoint of step 4 replays 5.. with other values
        ctl.receive(StepMetrics(step, {"train/loss": step + 0.5}))
    ctl.close()
    assert scalars(board, "train/loss") == {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0, 5: 5.5, 6: 6.5, 7: 7.5, 8: 8.5}
    assert scalars(board, "val/loss") == {4: 2.0} and texts(board, "val/generations") == {4: "| table 4 |"}
    again = Controller(cfg, tmp_path, tracker=TensorBoardTracker(board))  # --resume from step 6
    again.start_from(6)
    again.receive(StepMetrics(7, {"train/loss": 70.0}))
    again.close()
    assert scalars(board, "train/loss") == {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0, 5: 5.5, 6: 6.5, 7: 70.0}
