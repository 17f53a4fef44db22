"""What a search leaves, from the trials' records alone (no Ray): statuses, the best trial, the CSV."""
import csv
import json
from dataclasses import replace

import pytest

from launcher.records import Evaluation, TrialRecord
from launcher.tune_results import collect, pick_best, top_lines, trial_line, write_results
from trainer.config import ConfigError, TuneConfig


def record(trial, status, losses, lr):
    return TrialRecord(trial, {"optim.lr": lr}, status, steps=max(losses, default=0), wall_s=10.0,
                       history=tuple(Evaluation(s, {"loss": v}) for s, v in sorted(losses.items())))


RECORDS = [record("t_00000", "completed", {3: 5.0, 6: 4.0}, 3e-3),
           record("t_00001", "completed", {3: 5.2, 6: 3.9}, 1e-3),
           record("t_00002", "stopped early", {3: 3.0}, 30.0),  # lower, but did not run its schedule
           record("t_00003", "failed", {}, 100.0)]


def test_the_best_trial_is_the_best_final_value_among_completed_trials():
    assert pick_best(TuneConfig(metric="loss", mode="min"), RECORDS).trial == "t_00001"
    assert pick_best(TuneConfig(metric="loss", mode="max"), RECORDS).trial == "t_00000"
    with pytest.raises(ConfigError, match="no trial completed its schedule"):
        pick_best(TuneConfig(), RECORDS[2:])


def test_results_csv_has_a_row_per_trial_and_a_column_per_evaluation_step(tmp_path):
    write_results(tmp_path, TuneConfig(space={"optim.lr": {"grid": [1e-3]}}), RECORDS)
    with (tmp_path / "tune_results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["trial"] for r in rows] == ["t_00000", "t_00001", "t_00002", "t_00003"]
    assert list(rows[0]) == ["trial", "status", "steps", "wall_s", "optim.lr", "final_loss", "loss@3", "loss@6"]
    assert rows[2]["loss@3"] == "3.0" and rows[2]["loss@6"] == "" and rows[1]["final_loss"] == "3.9"


def test_a_trial_that_ended_without_finishing_its_record_is_stopped_early_or_failed(tmp_path):
    for r in RECORDS[:2]:
        (tmp_path / "trials" / r.trial).mkdir(parents=True)
        (replace(r, status="running") if r.trial == "t_00001" else r).write(tmp_path / "trials" / r.trial)
    statuses = {r.trial: r.status for r in collect(tmp_path)}
    assert statuses == {"t_00000": "completed", "t_00001": "stopped early"}
    assert json.loads((tmp_path / "trials" / "t_00001" / "trial.json").read_text())["status"] == "running"


def test_console_lines_say_why_a_trial_ended_and_rank_the_best_first():
    tune = TuneConfig()
    assert trial_line(RECORDS[2], tune) == ("trial t_00002 stopped early after step 3: optim.lr=30; val loss 3 at "
                                            "step 3; stopped by ASHA")
    lines = top_lines(tune, RECORDS)
    assert lines[0] == "top trials by final val loss (min):"
    assert [line.split()[1] for line in lines[1:]] == ["t_00001", "t_00000", "t_00002", "t_00003"]


def test_a_record_reads_back_as_it_was_written(tmp_path):
    """trial.json is the record's only form on disk: every field survives the round trip."""
    failed = replace(RECORDS[1], status="failed", error="data.train_file: no such file", bad_input=True,
                     final_checkpoint="/x/step_0000006")
    failed.write(tmp_path)
    assert TrialRecord.read(tmp_path) == failed
    assert json.loads((tmp_path / "trial.json").read_text())["history"] == [{"step": 3, "loss": 5.2},
                                                                          {"step": 6, "loss": 3.9}]
    assert TrialRecord.read(tmp_path / "none") is None
