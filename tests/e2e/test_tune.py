"""`sft-launch --tune`: a real Ray Tune search, four trials two at a time, one DeepSpeed worker each.

Two of the four learning rates are deliberately bad (30 and 100): ASHA (grace 1 evaluation, reduction
factor 2) must stop at least one of them early, the others run their schedule, the controller tests
the best trial once, and best_config.yaml reproduces the best trial as a plain run.
"""
import csv
import json
from pathlib import Path

import pytest
import yaml

from tests.e2e.common import launch, scalars
from tests.helpers import tiny_config, write_config

pytestmark = pytest.mark.e2e

LRS = [3e-3, 1e-3, 30.0, 100.0]


@pytest.fixture(scope="module")
def search(tmp_path_factory, tokenizer_dir):
    tmp = tmp_path_factory.mktemp("tune")
    raw = tiny_config(tmp, tokenizer_dir,
                      train={"max_steps": 12, "eval_every": 3, "save_every": 3, "micro_batch_size": 8, "log_every": 3},
                      scaling={"nodes": 1, "workers_per_node": 1, "cpus_per_worker": 1},
                      tune={"metric": "loss", "mode": "min", "num_samples": 1, "max_concurrent_trials": 2,
                            "grace_period": 1, "reduction_factor": 2, "space": {"optim.lr": {"grid": LRS}}},
                      # MLflow's embedded default: one SQLite file that the trials (two at a time) share
                      tracking={"report_to": ["tensorboard", "mlflow"], "mlflow": {"experiment": "search"}})
    proc = launch(write_config(tmp / "search.yaml", raw), "--tune")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp / "run"
    with (out / "tune_results.csv").open() as f:
        rows = list(csv.DictReader(f))
    return out, proc, rows


def test_every_trial_is_a_run_and_asha_stops_a_bad_one_early(search):
    out, proc, rows = search
    assert sorted(float(r["optim.lr"]) for r in rows) == sorted(LRS)
    statuses = {float(r["optim.lr"]): r["status"] for r in rows}
    assert "stopped early" in {statuses[30.0], statuses[100.0]}, statuses
    # 3e-3 leads at every evaluation, so ASHA never stops it; 1e-3 may go either way (trials are
    # compared as they reach an evaluation, in whatever order they get there)
    assert statuses[3e-3] == "completed" and statuses[1e-3] in ("completed", "stopped early"), statuses
    for r in rows:
        trial = out / "trials" / r["trial"]
        assert (trial / "tensorboard").is_dir() and list((trial / "checkpoints").glob("attempt-*/step_*/.complete"))
        assert scalars(trial / "tensorboard", "val/loss"), r["trial"]  # each trial logs its own curve
        if r["status"] == "completed":
            assert int(r["steps"]) == 12 and r["loss@12"]
        else:
            assert int(r["steps"]) < 12
    # one console line per trial that ended, then the table of the best
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("[sft] trial ") for line in lines) == 4
    assert any("stopped by ASHA" in line for line in lines)
    assert any(line.startswith("[sft] top trials by final val loss") for line in lines)


def test_the_best_trial_is_tested_once_and_exported(search):
    out, proc, rows = search
    completed = [r for r in rows if r["status"] == "completed"]
    best = min(completed, key=lambda r: float(r["final_loss"]))
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["tune"]["best_trial"] == best["trial"]
    assert summary["status"] == "completed" and [r["rank"] for r in summary["ranks"]] == [0]
    test = json.loads((out / "test_metrics.json").read_text())
    assert test["checkpoint"].startswith(str(out / "trials" / best["trial"] / "checkpoints"))
    assert test["after"]["loss"] < test["before"]["loss"]
    assert (out / "final_model" / "model.safetensors").exists()
    # The test split was evaluated once, by the controller's test group: no trial has a test result.
    assert [p for p in out.rglob("test_metrics.json") if "mlflow-artifacts" not in p.parts] == [out / "test_metrics.json"]
    assert sum(line.startswith("[sft] test (step") for line in proc.stdout.splitlines()) == 1
    for r in rows:
        tags = scalars(out / "trials" / r["trial"] / "tensorboard", "test/loss")
        assert not tags, r["trial"]


def test_hparams_are_written_for_every_trial(search):
    """TensorBoard's HParams dashboard (`tensorboard --logdir <output_dir>`) gets each trial's values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    out, _, rows = search
    for r in rows:
        acc = EventAccumulator(str(out / "trials" / r["trial"] / "tensorboard" / "hparams"))
        acc.Reload()
        content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
        assert info.hparams["optim.lr"].number_value == pytest.approx(float(r["optim.lr"]))
        assert info.hparams["status"].string_value == r["status"]


def test_best_config_is_a_plain_run_that_reproduces_the_best_trial(search, process_group, tmp_path):
    """best_config.yaml loads as a plain config (no tune section) and, run by the same worker loop
    (in this process, one worker as in the trial), gives the best trial's validation curve."""
    from trainer.config_load import load_config
    from trainer.loop import WorkerArgs, run
    from trainer.report import ListReporter

    out, _, rows = search
    best = json.loads((out / "run_summary.json").read_text())["tune"]
    raw = yaml.safe_load((out / "best_config.yaml").read_text())
    assert raw["tune"] is None and raw["optim"]["lr"] == best["best_values"]["optim.lr"]
    cfg = load_config(out / "best_config.yaml")
    reporter = ListReporter(tmp_path / "ckpt")
    run(cfg, reporter, WorkerArgs(cache_dir=str(tmp_path / "cache")))
    mine = {m.step: m.validation["loss"] for m, _ in reporter.calls if m.validation}
    trial = json.loads((out / "trials" / best["best_trial"] / "trial.json").read_text())
    theirs = {h["step"]: h["loss"] for h in trial["history"]}
    assert mine.keys() == theirs.keys() == {3, 6, 9, 12}
    assert mine == pytest.approx(theirs, rel=1e-5)


def test_tune_without_a_section_or_over_a_finished_search_is_refused(search, tmp_path, tokenizer_dir):
    out, _, _ = search
    plain = write_config(tmp_path / "plain.yaml", tiny_config(tmp_path, tokenizer_dir))
    proc = launch(plain, "--tune")
    assert proc.returncode == 2 and "--tune needs a tune: section" in proc.stderr
    again = launch(Path(out).parent / "search.yaml", "--tune")
    assert again.returncode == 2 and "already holds a search or a run" in again.stderr


def test_the_search_is_one_mlflow_run_with_a_nested_run_per_trial(search):
    """In the search's own SQLite store: the parent has the results table and the best trial's test
    metrics; each trial is a child run with its searched value as a parameter and its validation curve."""
    from mlflow.tracking import MlflowClient

    out, _, rows = search
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    parent = json.loads((out / "tracking.json").read_text())["mlflow"]["run_id"]
    assert "tune_results.csv" in {a.path for a in client.list_artifacts(parent)}
    tested = json.loads((out / "test_metrics.json").read_text())
    assert client.get_metric_history(parent, "test/loss")[0].value == pytest.approx(tested["after"]["loss"], rel=1e-6)
    for r in rows:
        child = client.get_run(json.loads((out / "trials" / r["trial"] / "tracking.json").read_text())["mlflow"]["run_id"])
        assert child.data.tags["mlflow.parentRunId"] == parent and child.info.run_name == r["trial"]
        assert float(child.data.params["optim.lr"]) == float(r["optim.lr"])
        curve = {m.step: m.value for m in client.get_metric_history(child.info.run_id, "val/loss")}
        assert curve == pytest.approx(scalars(out / "trials" / r["trial"] / "tensorboard", "val/loss"), rel=1e-6)
