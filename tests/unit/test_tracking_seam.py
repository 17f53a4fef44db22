"""The tracking seam's own logic, without a tracker's server: what an append-only backend (MLflow,
W&B) is sent around checkpoints, restarts and resumes (Held), and how a backend that stops
answering costs one warning and no point (Background)."""
import re
import threading
import time

import pytest

from launcher.tracking import Background, Held, flatten, missing_library, redact, run_params
from tests.helpers import tiny_config
from trainer.config import ConfigError
from trainer.config_load import from_dict


class Recorder:
    """A backend that keeps what it is sent (the component under test is the seam in front of it)."""
    name, where, identity = "rec", "the recorder", {}

    def __init__(self, fail_first: int = 0):
        self.points: list[tuple[int, dict]] = []
        self.fail_first = fail_first
        self.closed = False
        self.gate = threading.Event()
        self.gate.set()

    def scalars(self, values, step, stamp):
        self.gate.wait()
        if self.fail_first:
            self.fail_first -= 1
            raise ConnectionError("connection refused")
        self.points.append((step, values))

    def close(self):
        self.closed = True


class Direct:
    """Held's inner side, called at once (Background's thread is tested on its own below)."""
    def __init__(self, backend):
        self.backend, self.name = backend, backend.name

    def scalars(self, values, step):
        self.backend.scalars(values, step, 0)

    def close(self):
        pass


def test_points_wait_for_their_checkpoint_and_a_restart_replays_nothing_into_the_backend():
    rec = Recorder()
    held = Held(Direct(rec))
    for step in range(1, 7):
        held.scalars({"train/loss": float(step)}, step)
    assert rec.points == []  # no checkpoint yet
    held.commit(4)  # the checkpoint of step 4 completed
    assert [s for s, _ in rec.points] == [1, 2, 3, 4]
    held.rewind(4)  # a worker died after step 6: the group restarts from step 4's checkpoint
    for step in range(5, 9):
        held.scalars({"train/loss": step + 0.5}, step)
    held.commit(8)
    assert [(s, v["train/loss"]) for s, v in rec.points][4:] == [(5, 5.5), (6, 6.5), (7, 7.5), (8, 8.5)]
    held.scalars({"test/loss": 0.1}, 8)  # at a committed step: sent at once
    assert rec.points[-1] == (8, {"test/loss": 0.1})


def test_a_stopped_run_sends_nothing_past_its_last_checkpoint_and_a_resume_starts_after_it():
    rec = Recorder()
    held = Held(Direct(rec))
    for step in range(1, 4):
        held.scalars({"train/loss": float(step)}, step)
    held.commit(2)
    held.close()  # stopped after step 3: its point would come again after a resume
    resumed = Held(Direct(rec))
    resumed.rewind(2)  # --resume from step 2's checkpoint
    resumed.scalars({"train/loss": 30.0}, 3)
    resumed.commit(3)
    assert [(s, v["train/loss"]) for s, v in rec.points] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_a_backend_that_stops_answering_costs_one_warning_and_no_point(capsys):
    rec = Recorder(fail_first=3)
    bg = Background(rec, retry_s=0.05)
    for step in range(1, 6):
        bg.scalars({"train/loss": float(step)}, step)
    assert bg.flush(timeout_s=10) == {}
    bg.close()
    out = capsys.readouterr().out
    assert out.count("does not answer (ConnectionError: connection refused)") == 1
    assert out.count("answers again; the waiting points are being sent") == 1
    assert [s for s, _ in rec.points] == [1, 2, 3, 4, 5] and rec.closed


def test_the_buffer_is_bounded_and_the_gap_is_counted():
    rec = Recorder()
    rec.gate.clear()  # the backend hangs on the first call: the others wait behind it
    bg = Background(rec, limit=3)
    bg.scalars({"train/loss": 1.0}, 1)
    deadline = time.monotonic() + 10
    while not bg._sending and time.monotonic() < deadline:  # wait until the first call is being sent
        time.sleep(0.01)
    assert bg._sending, "the first call never started"
    for step in range(2, 8):
        bg.scalars({"train/loss": float(step)}, step)
    rec.gate.set()
    assert bg.flush(timeout_s=5) == {"rec": 4}  # 2, 3, 4 and 5 overflowed
    bg.close()
    assert [s for s, _ in rec.points] == [1, 6, 7]


def test_params_are_the_config_as_dotted_keys_without_credentials(tmp_path):
    raw = tiny_config(tmp_path, tmp_path, tracking={"mlflow": {"tracking_uri": "https://alice:s3cret@mlflow.example:5000"}})
    params = run_params(from_dict(raw))
    assert params["optim.lr"] == raw["optim"]["lr"] and params["train.max_steps"] == raw["train"]["max_steps"]
    assert params["tracking.mlflow.tracking_uri"] == "https://***@mlflow.example:5000"
    assert "s3cret" not in repr(params)
    assert flatten({"a": {"b": 1, "c": {}}, "d": [1]}) == {"a.b": 1, "a.c": {}, "d": [1]}
    assert redact("sqlite:////x/mlflow.db") == "sqlite:////x/mlflow.db"


@pytest.mark.parametrize("value, message", [
    ("[mlfow]", "unknown tracker 'mlfow'; choose from tensorboard, mlflow, wandb (or none)"),
    ("[mlflow, mlflow]", "names a tracker twice")])
def test_report_to_is_checked_at_load(tmp_path, value, message):
    import yaml

    raw = tiny_config(tmp_path, tmp_path, tracking={"report_to": yaml.safe_load(value)})
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_dict(raw)
    assert from_dict(tiny_config(tmp_path, tmp_path, tracking={"report_to": "none"})).tracking.report_to == ()


def test_a_backend_whose_library_is_missing_names_the_extra(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = from_dict(tiny_config(tmp_path, tmp_path, tracking={"report_to": ["tensorboard", "wandb"]}))
    assert "pip install 'sft[wandb]'" in missing_library(cfg)


def test_a_search_over_several_nodes_on_the_embedded_sqlite_store_is_refused(tmp_path, monkeypatch):
    from launcher.tune import check_search

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw = tiny_config(tmp_path, tmp_path, tune={"space": {"optim.lr": {"grid": [1e-3, 3e-3]}}},
                      scaling={"nodes": 2, "workers_per_node": 1}, tracking={"report_to": ["mlflow"]})
    with pytest.raises(ConfigError, match=r"embedded SQLite store, and a search over 2 nodes.*mlflow server"):
        check_search(from_dict(raw), False, tmp_path / "out")
    raw["tracking"]["mlflow"] = {"tracking_uri": "http://mlflow.internal:5000"}
    check_search(from_dict(raw), False, tmp_path / "out")  # a server: fine
