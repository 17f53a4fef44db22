"""sft on a real Slurm: slurmctld + two slurmd (emulated nodes n1, n2 on 127.0.1.x) + munge, started
by slurm/local/start-local-slurm.sh. A 2-node job completes with a rank on each node; USR1 to the
batch script checkpoints, requeues, and the requeued job resumes to the same result."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root (it installs and starts slurmctld, slurmd, munge)")
    if not shutil.which("sbatch") and not shutil.which("apt-get"):
        pytest.skip("no Slurm and no apt-get to install it")
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "LOCAL_SLURM_DIR": str(state), "LOCAL_SLURM_NODES": "2"}
    start = subprocess.run(["bash", str(REPO / "slurm/local/start-local-slurm.sh")], env=env,
                           capture_output=True, text=True, timeout=600)
    assert start.returncode == 0, start.stderr[-3000:]
    env["SLURM_CONF"] = str(state / "etc" / "slurm.conf")
    yield env
    subprocess.run(["bash", str(REPO / "slurm/local/stop-local-slurm.sh")], env=env, capture_output=True, timeout=120)


def render(env, config: Path, out: Path) -> Path:
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", str(config), "--slurm", "--nodes", "2",
                           "--workers-per-node", "1", "--output", str(out)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out / "sft.sbatch"


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


def test_two_node_job_checkpoints_on_usr1_requeues_and_resumes_with_a_rank_on_each_node(slurm, zero2, tmp_path):
    """One job covers the whole Slurm path (a second, uninterrupted job would only repeat its start):
    2 nodes with a rank each, the per-job token, USR1 -> checkpoint -> requeue -> resume, and the
    same results as the single-node run."""
    single, config, _ = zero2
    out = tmp_path / "run"
    script = render(slurm, config, out)
    assert "#SBATCH --nodes=2" in script.read_text() and "--signal=B:USR1@120" in script.read_text()
    job = subprocess.run(["sbatch", "--parsable", str(script)], env=slurm, capture_output=True, text=True,
                         check=True).stdout.strip().split(";")[0]
    log = lambda: "".join(p.read_text() for p in out.glob("slurm-*.out"))
    wait_for(lambda: "[sft] training: 2 worker(s)" in log(), 300, "training to start")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True)
    done = lambda: (out / "run_summary.json").is_file() and \
        json.loads((out / "run_summary.json").read_text()).get("status") == "completed"
    wait_for(done, 900, "the requeued job to finish")
    text = log()
    assert "SIGUSR1: the workers checkpoint after the current step and stop" in text
    assert f"requeueing job {job}" in text
    assert re.search(r"resuming from .*step_0+1\b", text)
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["global_step"] == 12 and summary["attempt"] == "attempt-2"
    assert summary["world_size"] == 2 and len({r["node_id"] for r in summary["ranks"]}) == 2
    assert sorted(r["ip"] for r in summary["ranks"]) == ["127.0.1.1", "127.0.1.2"]
    a = json.loads((out / "test_metrics.json").read_text())["after"]
    b = json.loads((single / "test_metrics.json").read_text())["after"]
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    token = next((out / ".slurm").glob("*/ray_token"))
    assert oct(token.stat().st_mode & 0o777) == "0o600"  # readable by the user only
