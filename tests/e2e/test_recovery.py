"""Nothing lost: a SIGKILLed worker is replaced and the run ends as if nothing happened; SIGUSR1
makes the launcher checkpoint and stop, and --resume finishes the run with the same results. The
launcher runs as a real subprocess here: the tests signal it and kill its workers."""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.common import launch, scalars
from tests.helpers import tiny_config, write_config

pytestmark = pytest.mark.e2e


def long_config(tmp, tokenizer_dir):
    """150 short steps: a wide window to kill a worker in mid-run."""
    return write_config(tmp / "long.yaml", tiny_config(
        tmp, tokenizer_dir, train={"max_steps": 150, "eval_every": 25, "save_every": 25, "log_every": 25,
                                   "keep_last": 2, "max_failures": 2},
        scaling={"workers_per_node": 1}))  # one worker: its death restarts the group all the same


def train_worker_pids() -> list[int]:
    """The Ray Train worker processes running now (Ray titles them ray::RayTrainWorker...)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"RayTrainWorker" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            pass
    return sorted(pids)


def popen(config, *extra):
    return subprocess.Popen([sys.executable, "-m", "launcher.cli", str(config), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="session")
def baseline(tmp_path_factory, tokenizer_dir):
    tmp = tmp_path_factory.mktemp("baseline")
    config = long_config(tmp, tokenizer_dir)
    proc = launch(config)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return tmp / "run", config


def test_killed_worker_is_replaced_and_the_run_ends_like_an_uninterrupted_one(baseline, tmp_path):
    out, config = baseline
    target = tmp_path / "run"
    proc = popen(config, "--output", str(target), "--verbose")  # --verbose: the workers' own output too
    lines, killed = [], None
    for line in proc.stdout:
        lines.append(line)
        if "[sft] step 75/150" in line and killed is None:
            killed = train_worker_pids()[-1]
            os.kill(killed, signal.SIGKILL)
    assert proc.wait(timeout=600) == 0, "".join(lines[-40:])
    text = "".join(lines)
    assert killed is not None and "(RayTrainWorker pid=" in text
    assert re.search(r"worker failure \(.*\); restart 1/2: the worker group continues from the latest "
                     r"checkpoint \(step (50|75|100)\)", text), text[-3000:]
    summary = json.loads((target / "run_summary.json").read_text())
    assert summary["restarts"] == 1 and summary["global_step"] == 150
    a = json.loads((target / "test_metrics.json").read_text())["after"]
    b = json.loads((out / "test_metrics.json").read_text())["after"]
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    assert [h["step"] for h in summary["validation_history"]] == [25, 50, 75, 100, 125, 150]
    new, old = scalars(target / "tensorboard", "train/loss"), scalars(out / "tensorboard", "train/loss")
    assert sorted(new) == list(range(1, 151))  # the replayed steps are not duplicated
    assert [new[s] for s in range(110, 151)] == pytest.approx([old[s] for s in range(110, 151)], abs=1e-6)


def test_sigusr1_checkpoints_and_stops_with_exit_75(resumed):
    """The stop half of the shared `resumed` run (conftest.py); tests/e2e/test_e2e.py checks that its
    --resume finishes with the uninterrupted run's losses."""
    _, (text, code, summary, tested), _ = resumed
    assert code == 75, text[-3000:]
    assert "SIGUSR1: the workers checkpoint after the current step and stop" in text
    assert "stopped at step 1" in text
    assert summary["status"] == "stopped" and summary["global_step"] == 1
    assert not tested  # no test evaluation for a stopped run
