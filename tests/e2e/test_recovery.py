"""Nothing lost: a SIGKILLed worker is replaced and the run ends as if nothing happened; SIGTERM (and
Ctrl-C) make the launcher checkpoint and stop, a full disk ends the run in one paragraph, and --resume
finishes the run. The launcher runs as a real subprocess here: the tests signal it and kill its workers."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.common import scalars, train_worker_pids
from tests.helpers import tiny_config, write_config

pytestmark = pytest.mark.e2e


def popen(config, *extra):
    return subprocess.Popen([sys.executable, "-m", "launcher.cli", str(config), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_sigterm_checkpoints_and_stops_with_exit_75(resumed):
    """The stop half of the shared `resumed` run (conftest.py); tests/e2e/test_e2e.py checks that its
    --resume finishes with the uninterrupted run's losses. SIGTERM once aborted the launcher (exit 134:
    ray.init had put its own handlers in place of the launcher's)."""
    _, (text, code, summary, tested, _, _), _ = resumed
    assert code == 75, text[-3000:]
    assert "SIGTERM: the workers checkpoint after the current step and stop" in text
    assert "SIGTERM received" not in text  # Ray's C++ handler
    assert "stopped at step 1" in text
    assert summary["status"] == "stopped" and summary["global_step"] == 1
    assert not tested  # no test evaluation for a stopped run


def test_a_second_launch_into_a_running_output_directory_is_refused(resumed):
    target, (text, _, _, _, refused, pid), _ = resumed
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert refused.stderr.startswith(f"sft-launch: error: output_dir {target} is in use by another sft-launch "
                                     f"(host {socket.gethostname()}, pid {pid}, started "), refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert "Traceback" not in text  # the running launch went on, untouched
    assert not (target / ".sft-launch.lock").exists()  # released by the launch that held it


def test_ctrl_c_in_preflight_stops_the_launch_with_exit_75(tmp_path, tokenizer_dir):
    """Ctrl-C as a terminal sends it: to the launcher's whole process group, here during preflight.
    No cluster starts, and the output directory holds nothing to resume yet."""
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, tokenizer_dir))
    proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "[sft] preflight:" in line:
            os.killpg(proc.pid, signal.SIGINT)
    text = "".join(lines)
    assert proc.wait(timeout=300) == 75, text[-3000:]
    assert "SIGINT: the workers checkpoint after the current step and stop" in text
    assert "[sft] training: " not in text and "Traceback" not in text
    assert json.loads((tmp_path / "run" / "run_summary.json").read_text())["status"] == "stopped"


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs: a filesystem the test can fill (mounting needs root); None where none can be mounted."""
    where = tmp_path / "small"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(where)], capture_output=True).returncode:
        yield None
        return
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(directory: Path, leave: int) -> Path:
    """Write a ballast file until the filesystem refuses (ENOSPC), then give `leave` bytes back: room for
    the driver's small writes (TensorBoard's events, whose writer thread would print its own traceback),
    none for the next checkpoint (its model states alone are ~170 kB)."""
    ballast = directory / "ballast"
    with open(ballast, "wb", buffering=0) as f:
        try:
            while True:
                f.write(bytes(2**16))  # unbuffered: a short write fills the last bytes, the next one fails
        except OSError:
            pass
        f.truncate(max(0, os.fstat(f.fileno()).st_size - leave))
    return ballast


def test_a_full_disk_ends_the_run_and_the_resume_on_one_worker_survives_a_killed_worker(
        small_disk, tmp_path, tokenizer_dir, mlflow_server):
    """One long run (150 short steps, a checkpoint every 25: a wide window for each event) meets the
    interruptions a real one does, in two launches.

    The disk: the output directory's filesystem fills after the first checkpoint; the run ends at the next
    refused write with one paragraph (what, where, the OS error, the checkpoint to resume from), exit 1,
    no worker restart, nothing half-written marked complete. (Where no tmpfs can be mounted, not root,
    SIGTERM stops this launch instead, and the full-disk half is not checked.)

    Another world size: freed, --resume continues as a user launches it, the two workers' checkpoint on
    one worker, which converts it to DeepSpeed's universal format (with the optimizer state) and goes on.
    The other direction (one rank's checkpoint on two), a restart (not a --resume) at another size, ZeRO-3
    and a failed conversion are two-rank spawns in tests/ranks/test_restore.py; the conversion does not
    depend on the ZeRO stage.

    A killed worker: in that resumed launch a worker is SIGKILLed between two checkpoints; the worker
    group restarts from the latest one and replays the steps since: each replayed step logs the loss it
    logged before the kill (the run goes on exactly as an uninterrupted one; tests/loop proves a resumed
    run's losses equal an uninterrupted run's, tests/e2e/test_e2e.py the same for two workers after a
    SIGTERM). MLflow, which cannot delete a point, gets each step once: across the kill and across the
    two launches."""
    from mlflow.tracking import MlflowClient

    from trainer import checkpoints

    out = (small_disk or tmp_path) / "run"
    raw = tiny_config(tmp_path, tokenizer_dir,
                      train={"max_steps": 150, "eval_every": 25, "save_every": 25, "log_every": 5, "keep_last": 20,
                             "max_failures": 2},
                      data={"cache_dir": str(tmp_path / "cache")}, output_dir=str(out),
                      tracking={"report_to": ["tensorboard", "mlflow"], "mlflow": {"tracking_uri": mlflow_server.uri}})
    config = write_config(tmp_path / "long.yaml", raw)

    # The first launch, two workers: the disk fills once the first checkpoint is complete.
    proc = popen(config)
    lines, interrupted = [], None
    for line in proc.stdout:
        lines.append(line)
        if "[sft] eval  step 25:" in line and interrupted is None:  # the controller marked checkpoint 25
            interrupted = fill(small_disk, leave=96 * 1024) if small_disk else proc.send_signal(signal.SIGTERM)
    text = "".join(lines)
    assert proc.wait(timeout=600) == (1 if small_disk else 75), text[-3000:]
    assert "worker failure" not in text and "restart 1/" not in text  # a full disk costs no restart
    complete = checkpoints.find_checkpoints(out / "checkpoints")
    assert complete and all(not checkpoints.corrupted_files(p) for _, p in complete)
    assert complete[-1][0] < 150 and not (out / "final_model").exists()
    if small_disk:
        failed = [line for line in lines if line.startswith("sft-launch: the run failed: ")]
        assert len(failed) == 1 and "Traceback" not in text, text[-3000:]
        assert "[Errno 28] No space left on device" in failed[0] and "could not write " in failed[0]
        assert "the run stopped without restarting the workers; the latest complete checkpoint is " in failed[0]
        assert f"--output {out} --resume" in failed[0]
        assert f"{complete[-1][1]} (step {complete[-1][0]})" in failed[0]
        interrupted.unlink()
    source, start = complete[-1][1], complete[-1][0]  # a multiple of 25; after SIGTERM, the step it stopped at
    assert checkpoints.read_state(source).world_size == 2
    first_logged = start - start % 5 + 5  # the resumed launch's first step on the console (log_every 5)
    kill_at = first_logged + 35  # at least 40 steps in: past a checkpoint of the resumed launch

    # The resumed launch, one worker (--verbose: the workers' own output too); one of its workers is killed.
    proc = popen(config, "--resume", "--workers-per-node", "1", "--verbose")
    lines, killed = [], None
    for line in proc.stdout:
        lines.append(line)
        if f"[sft] step {kill_at}/150" in line and killed is None:
            killed = train_worker_pids(proc.pid)[-1]
            os.kill(killed, signal.SIGKILL)
    text = "".join(lines)
    assert proc.wait(timeout=600) == 0, text[-4000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["global_step"] == 150 and summary["resumed_from"] == str(source) and summary["world_size"] == 1
    assert "universal format" in text and f"training steps {start + 1}..150 on 1 worker(s)" in text
    assert list((source / checkpoints.UNIVERSAL_TAG / "zero").glob("*/exp_avg.pt"))  # Adam's moments travelled
    assert checkpoints.read_state(Path(summary["final_checkpoint"])).world_size == 1
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert metrics["after"]["loss"] < metrics["before"]["loss"] and (out / "final_model" / "model.safetensors").exists()

    assert killed is not None and "(RayTrainWorker pid=" in text
    restart = re.search(r"worker failure \(.*\); restart 1/2: the worker group continues from the latest "
                        r"checkpoint \(step (\d+)\)", text)
    assert restart and start < int(restart.group(1)) < 150 and int(restart.group(1)) % 25 == 0, text[-3000:]
    logged: dict[int, list[str]] = {}
    for step, loss in re.findall(r"\[sft\] step (\d+)/150  loss (\S+)", text):
        logged.setdefault(int(step), []).append(loss)
    replayed = {step: losses for step, losses in logged.items() if len(losses) > 1}
    assert replayed and min(replayed) == int(restart.group(1)) + 5, logged
    assert all(len(set(losses)) == 1 for losses in replayed.values()), replayed
    assert sorted(logged) == list(range(first_logged, 151, 5))
    assert summary["restarts"] == 1
    assert [h["step"] for h in summary["validation_history"]] == [s for s in range(25, 151, 25) if s > start]
    new = scalars(out / "tensorboard", "train/loss")
    assert sorted(new) == list(range(1, 151))  # the first launch's steps too; the replayed ones not twice
    assert all(abs(new[step] - float(losses[0])) < 6e-5 for step, losses in logged.items())  # as on the console
    run_id = json.loads((out / "tracking.json").read_text())["mlflow"]["run_id"]
    tracked = sorted((m.step, m.value) for m in MlflowClient(mlflow_server.uri).get_metric_history(run_id, "train/loss"))
    assert [s for s, _ in tracked] == list(range(1, 151))  # no step twice, none missing
    assert all(abs(v - new[s]) < 1e-6 for s, v in tracked)
