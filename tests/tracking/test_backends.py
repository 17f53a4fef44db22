"""MLflow and W&B behind the tracking seam, against the real things: an `mlflow server` on 127.0.0.1
read back with MlflowClient, and W&B's offline run files read back with W&B's own record schema.
No Ray: the run's controller is the one writer, so these drive the trackers as it does."""
import json
from dataclasses import replace
from pathlib import Path

import pytest

from launcher.tracking import open_tracker, run_params
from tests.helpers import item_key, tiny_config, wandb_history, wandb_records
from trainer.config import ConfigError
from trainer.config_load import from_dict


@pytest.fixture
def server(mlflow_server):
    return mlflow_server


def _cfg(tmp_path, **tracking):
    return from_dict(tiny_config(tmp_path, tmp_path, tracking=tracking))


def _six_steps(tmp_path, **tracking):
    """A run's trackers opened as the controller opens them, its parameters and six steps of loss sent."""
    cfg = _cfg(tmp_path, **tracking)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True)
    tracker = open_tracker(cfg, out)
    tracker.params(run_params(cfg), {"sft.world_size": "2"})
    for step in range(1, 7):
        tracker.scalars({"train/loss": 10.0 - step}, step)
    return cfg, out, tracker


def _history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_mlflow_run_keeps_its_points_params_files_and_id_across_a_resume(server, tmp_path):
    from mlflow.tracking import MlflowClient

    cfg, out, tracker = _six_steps(tmp_path, report_to=["mlflow"], mlflow={
        "tracking_uri": server.uri, "experiment": "seam", "tags": {"team": "nlp"}})
    tracker.text("val/generations", "| prompt | answer |", 4)
    tracker.commit(4)  # stopped after step 6: steps 5 and 6 come again after the resume
    (out / "run_summary.json").write_text("{}")
    tracker.artifact(out / "run_summary.json")
    assert tracker.flush(30) == {}
    tracker.close()
    run_id = json.loads((out / "tracking.json").read_text())["mlflow"]["run_id"]
    client = MlflowClient(server.uri)
    run = client.get_run(run_id)
    assert run.data.params["optim.lr"] == str(cfg.optim.lr) and run.data.params["train.max_steps"] == "12"
    assert run.data.tags["sft.world_size"] == "2" and run.data.tags["team"] == "nlp"
    assert _history(client, run_id, "train/loss") == [(s, 10.0 - s) for s in range(1, 5)]
    assert {a.path for a in client.list_artifacts(run_id)} >= {"run_summary.json", "val"}

    # --resume from step 4 with train.max_steps changed: the same run; the parameter stays, a tag says
    resumed = replace(cfg, train=replace(cfg.train, max_steps=20))
    tracker = open_tracker(resumed, out)
    tracker.rewind(4)
    tracker.params(run_params(resumed), {"sft.world_size": "2"})
    for step in range(5, 9):
        tracker.scalars({"train/loss": 100.0 + step}, step)
    tracker.commit(8)
    assert tracker.flush(30) == {}
    tracker.close()
    assert json.loads((out / "tracking.json").read_text())["mlflow"]["run_id"] == run_id
    run = client.get_run(run_id)
    assert run.data.params["train.max_steps"] == "12" and run.data.tags["sft.changed.train.max_steps"] == "12 -> 20"
    assert [s for s, _ in _history(client, run_id, "train/loss")] == list(range(1, 9))  # no step twice
    assert _history(client, run_id, "train/loss")[4:] == [(s, 100.0 + s) for s in range(5, 9)]
    assert run.info.status == "FINISHED"


def test_a_search_files_each_trial_as_a_nested_run(server, tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = _cfg(tmp_path, report_to=["mlflow"], mlflow={"tracking_uri": server.uri, "experiment": "search"})
    out = Path(cfg.output_dir)
    (out / "trials" / "t_0").mkdir(parents=True)
    parent = open_tracker(cfg, out, search=True)
    child = open_tracker(replace(cfg, output_dir=str(out / "trials" / "t_0")), out / "trials" / "t_0",
                         parent.as_parent(), "t_0")
    child.scalars({"val/loss": 1.5}, 4)
    child.commit(4)
    child.flush(30)
    child.close()
    parent.close()
    ids = {name: json.loads((d / "tracking.json").read_text())["mlflow"] for name, d in
           (("parent", out), ("child", out / "trials" / "t_0"))}
    client = MlflowClient(server.uri)
    trial = client.get_run(ids["child"]["run_id"])
    assert trial.data.tags["mlflow.parentRunId"] == ids["parent"]["run_id"] and trial.info.run_name == "t_0"
    assert trial.info.experiment_id == ids["parent"]["experiment_id"]
    assert _history(client, ids["child"]["run_id"], "val/loss") == [(4, 1.5)]


def test_a_server_that_goes_away_costs_one_warning_and_the_points_reach_it_when_it_is_back(server, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    cfg = _cfg(tmp_path, report_to=["mlflow"], mlflow={"tracking_uri": server.uri})
    out = Path(cfg.output_dir)
    out.mkdir(parents=True)
    tracker = open_tracker(cfg, out)
    for step in range(1, 4):
        tracker.scalars({"train/loss": float(step)}, step)
    tracker.commit(3)
    assert tracker.flush(30) == {}
    server.stop()
    try:
        for step in range(4, 9):
            tracker.scalars({"train/loss": float(step)}, step)
            tracker.commit(step)  # the run goes on: nothing here waits for the server
        assert tracker.flush(1) == {"mlflow": 5}  # waiting, not lost yet
    finally:
        server.start()
    assert tracker.flush(60) == {}
    tracker.close()
    out_text = capsys.readouterr().out
    assert out_text.count("does not answer") == 1 and out_text.count("answers again; the waiting points are being sent") == 1
    run_id = json.loads((out / "tracking.json").read_text())["mlflow"]["run_id"]
    assert [s for s, _ in _history(MlflowClient(server.uri), run_id, "train/loss")] == list(range(1, 9))


def test_a_server_that_does_not_answer_at_start_is_bad_input_naming_it(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there
    cfg = _cfg(tmp_path, report_to=["mlflow"], mlflow={"tracking_uri": f"http://bob:pw@127.0.0.1:{port}"})
    Path(cfg.output_dir).mkdir(parents=True)
    with pytest.raises(ConfigError) as err:
        open_tracker(cfg, Path(cfg.output_dir))
    assert f"the tracking store http://***@127.0.0.1:{port} cannot be used" in str(err.value)
    assert "pw" not in str(err.value)


def test_the_embedded_default_is_a_sqlite_store_in_the_output_directory(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    cfg = _cfg(tmp_path, report_to=["mlflow"])
    out = Path(cfg.output_dir)
    out.mkdir(parents=True)
    tracker = open_tracker(cfg, out)
    tracker.scalars({"train/loss": 1.0}, 1)
    tracker.commit(1)
    tracker.close()
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("from-env")
    assert experiment.artifact_location == (out / "mlflow-artifacts").as_uri()
    assert not (Path.cwd() / "mlruns").exists()


def test_wandb_offline_run_holds_the_points_config_and_summary_and_a_resume_keeps_its_id(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_DIR", raising=False)
    cfg, out, tracker = _six_steps(tmp_path, report_to=["wandb"], wandb={"mode": "offline", "project": "p",
                                                                          "tags": ["a"]})
    tracker.commit(6)
    tracker.scalars({"test/loss": 0.5}, 4)  # the best checkpoint's step, below W&B's last: the summary
    assert tracker.flush(30) == {}
    tracker.close()
    run_id = json.loads((out / "tracking.json").read_text())["wandb"]["run_id"]
    (run_file,) = (out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    assert wandb_history(run_file, "train/loss") == {s: 10.0 - s for s in range(1, 7)}
    records = wandb_records(run_file)
    config = {item_key(i): json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for i in r.config.update}
    summary = {item_key(i): json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "summary"
               for i in r.summary.update}
    assert config["optim.lr"] == cfg.optim.lr and config["sft.world_size"] == "2" and summary["test/loss"] == 0.5
    again = open_tracker(cfg, out)  # --resume: the same run id
    again.close()
    assert len(list((out / "wandb").glob(f"offline-run-*-{run_id}"))) >= 1
    assert json.loads((out / "tracking.json").read_text())["wandb"]["run_id"] == run_id
