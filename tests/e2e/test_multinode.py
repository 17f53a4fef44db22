"""A real two-node Ray cluster on this machine (two `ray start` processes, token auth on), joined with
--address: an elastic run (scaling.min_nodes 1) loses the second node mid-run, goes on on the first,
is stopped, and its --resume grows back when a node joins again; a request the cluster cannot hold
fails fast. That a search's trials get the same elastic worker group is shown without Ray
(tests/unit/test_tune_search.py). That two ranks on two nodes give the single-node run's results is
proven by the Slurm job (tests/slurm: two nodes, a rank on each, the same test loss), which joins its
cluster the same way; a launch here would only repeat it."""
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

from tests.e2e.common import descendants
from tests.helpers import tiny_config, write_config

pytestmark = pytest.mark.e2e
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive_nodes(address: str, env: dict) -> int:
    probe = ("import ray; ray.init(address=%r, logging_level='ERROR'); "
             "print(sum(1 for n in ray.nodes() if n['Alive']))" % address)
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    return int(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 and proc.stdout.strip() else 0


COMMON = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--object-store-memory=100000000", "--block"]


@dataclass
class Cluster:
    """The head (the driver's node) and the nodes that joined it, each its own `ray start` process
    group: the node's raylet and every worker it started."""
    address: str
    env: dict
    procs: list = field(default_factory=list)

    def add_node(self, wait: bool = True, alive: Optional[int] = None) -> None:
        """Start one more node; `wait`: until the cluster counts it alive (no blind sleep), beside the
        `alive` nodes it had (counted here unless the caller knows: each count is a Ray client, ~3 s)."""
        if wait and alive is None:
            alive = _alive_nodes(self.address, self.env)
        self.procs.append(subprocess.Popen([RAY, "start", f"--address={self.address}", *COMMON], env=self.env,
                                           start_new_session=True, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL))
        if not wait:
            return
        deadline = time.monotonic() + 90
        while _alive_nodes(self.address, self.env) < alive + 1:
            assert time.monotonic() < deadline, "the new Ray node did not join"
            time.sleep(1)

    def kill_node(self, proc) -> list[int]:
        """SIGKILL every process of a node, by pid: its `ray start`, raylet and agents (the process group
        of `proc`) and the workers the raylet started (its descendants, in sessions of their own)."""
        group = {int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit() and _pgid(int(e.name)) == proc.pid}
        node = group | descendants(group)
        for pid in node:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return sorted(node)


def _pgid(pid: int):
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


@pytest.fixture(scope="module")
def two_nodes():
    """Starts and stops only its own Ray processes (never `ray stop`, which ends every Ray here)."""
    # Ray's session directory holds its Unix sockets, whose paths may not pass 107 bytes: a pytest temp
    # directory (deeper still under xdist, .../popen-gw0/...) leaves the head unable to start.
    tmp = Path(tempfile.mkdtemp(prefix="sft-ray-"))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_USAGE_STATS_ENABLED": "0"}
    port = _free_port()
    cluster = Cluster(f"127.0.0.1:{port}", env)
    procs = cluster.procs
    # The GCS declares a node dead after missed health checks: 5 misses 3 s apart by default, here 2
    # misses 1 s apart, so the node-loss test does not wait out Ray's production margins.
    head_env = {**env, "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "2"}
    procs.append(subprocess.Popen([RAY, "start", "--head", f"--port={port}", "--include-dashboard=false",
                                   f"--temp-dir={tmp / 'ray'}", *COMMON], env=head_env, start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        deadline = time.monotonic() + 90
        while _alive_nodes(cluster.address, env) < 1:
            assert time.monotonic() < deadline, "the Ray head did not come up"
            time.sleep(1)
        cluster.add_node(alive=1)
        yield cluster
    finally:
        for proc in reversed(procs):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        # `ray start --block` takes ~30 s to end on SIGTERM; its group is ours alone: 5 s for them all.
        deadline = time.monotonic() + 5
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("extra, message", [
    (("--nodes", "2", "--workers-per-node", "64"), "cannot place 2 node(s) x 64 worker(s)")])
def test_asking_for_more_than_the_cluster_has_fails_fast(two_nodes, tokenizer_dir, tmp_path, extra, message):
    address, env = two_nodes.address, two_nodes.env
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path, tokenizer_dir))
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", str(config), "--address", address, *extra,
                           "--output", str(tmp_path / "run")],
                          env=env, capture_output=True, text=True, timeout=300)  # a hang would time out
    assert proc.returncode == 1 and message in proc.stderr
    assert "of its 2 node(s)" in proc.stderr and "CPUs" in proc.stderr


def test_a_lost_node_is_absorbed_by_a_resize_and_the_resumed_run_grows_back_when_a_node_joins(two_nodes, tokenizer_dir,
                                                                                              tmp_path):
    """scaling.min_nodes 1 of 2, one worker per node. Launch 1: the second node's Ray processes are killed
    by pid after the first checkpoints; the run goes on on the head node alone (from the latest checkpoint,
    converted to the new world size, the global batch kept), checkpoints there, and is stopped (SIGTERM,
    exit 75). Launch 2, `--resume` on the one node left: it continues from that checkpoint of one worker
    (the ones before the loss are of two), is still elastic (it starts on one node of the two it asks
    for) and grows back to two workers once a new node joins (converting its latest checkpoint); it
    completes with every step, each training example of the steps once, the test evaluation, and both
    resizes in run_summary.json (the first carried from launch 1), with train.max_failures 0 (a lost node
    is not a failure).

    The single worker of launch 2 is held (SIGSTOP) while the new node joins, so the run cannot end
    before Ray's resize check sees the node: nothing here depends on how fast the machine trains."""
    from tests.e2e.common import scalars, train_worker_pids
    from trainer import checkpoints

    steps, global_batch = 24, 4 * 2  # micro batch 4 x 2 workers (x accumulation 2 on one worker)
    raw = tiny_config(tmp_path, tokenizer_dir, train={
        "max_steps": steps, "micro_batch_size": 4, "eval_every": 12, "save_every": 2, "keep_last": 100,
        "log_every": 1, "max_failures": 0}, scaling={"nodes": 2, "workers_per_node": 1, "min_nodes": 1,
                                                     "resize_check_s": 1})
    config = write_config(tmp_path / "elastic.yaml", raw)
    target = tmp_path / "run"
    first = _Launch(two_nodes, config, target)
    # The events are checkpoints as the workers persist them (every 20 ms a look): the console reaches
    # the driver up to a poll later, when the group may be steps further. When the two workers write
    # step 4, Ray has registered step 2 (a report returns once the controller took it).
    first.wait_for(lambda: _written_by(target, 2, from_step=4))
    killed = two_nodes.kill_node(two_nodes.procs[1])
    first.wait_for(lambda: _written_by(target, 1))  # the group of one went on from the latest checkpoint
    first.proc.send_signal(signal.SIGTERM)  # the workers checkpoint after the current step and stop
    assert first.end() == 75, first.text[-4000:]
    assert len(killed) > 2, killed
    stopped = json.loads((target / "run_summary.json").read_text())
    assert stopped["status"] == "stopped" and stopped["world_size"] == 1 and stopped["restarts"] == 0
    assert [(r["from_world_size"], r["to_world_size"]) for r in stopped["resizes"]] == [(2, 1)]
    resize_lines = [line for line in first.lines if line.startswith("[sft] resize: ")]
    assert len(resize_lines) == 1 and "from 2 to 1 worker(s)" in resize_lines[0], first.text[-4000:]

    second = _Launch(two_nodes, config, target, "--resume")
    # Two checkpoints of its own: Ray has registered the first, which the grown group converts.
    second.wait_for(lambda: _written_by(target, 1, count=2, attempt="attempt-2"))
    held = train_worker_pids(*(p.pid for p in two_nodes.procs))
    for pid in held:
        os.kill(pid, signal.SIGSTOP)
    try:
        two_nodes.add_node(wait=False)  # the resize line below is the event
        # Held until Ray has grown the group (its autoscaling coordinator counts the node at its next
        # 20 s tick, the resize check then decides, and the held group is shut down after Ray's 5 s of
        # patience): the run cannot end first.
        second.wait_for(lambda: any("resize: the worker group goes from 1 to 2" in line for line in second.lines),
                        deadline=time.monotonic() + 300)
    finally:
        for pid in held:
            with contextlib.suppress(ProcessLookupError):  # the resize has ended it
                os.kill(pid, signal.SIGCONT)
    assert second.end() == 0, second.text[-4000:]
    assert len(held) == 1, held
    resize_lines = [line for line in second.lines if line.startswith("[sft] resize: ")]
    assert len(resize_lines) == 1 and "from 1 to 2 worker(s)" in resize_lines[0], second.text[-4000:]
    summary = json.loads((target / "run_summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == steps
    assert summary["world_size"] == 2 and summary["restarts"] == 0  # max_failures 0 was not used up
    resumed_from = Path(summary["resumed_from"])
    assert resumed_from == Path(stopped["final_checkpoint"]) and checkpoints.read_state(resumed_from).world_size == 1
    lost, grown = summary["resizes"]
    assert lost == stopped["resizes"][0]  # carried from launch 1
    final_nodes = {r["node_id"] for r in summary["ranks"]}
    assert (lost["from_world_size"], lost["to_world_size"], grown["from_world_size"], grown["to_world_size"]) == (2, 1, 1, 2)
    assert lost["node"] not in final_nodes and grown["node"] in final_nodes and lost["node"] != grown["node"]
    resumed_at = checkpoints.read_state(resumed_from).step
    assert 2 <= lost["step"] < resumed_at <= grown["step"] < steps and lost["lost_s"] > 0 and grown["lost_s"] > 0
    # The data positions: every checkpoint, whichever launch and size wrote it, is at step x global batch
    # places of epoch 0's order, so the run saw the first steps x global batch examples of that order,
    # each once (steps x global batch < the training split: no epoch boundary blurs it).
    found = checkpoints.find_checkpoints(target / "checkpoints")
    states = [(path.parent.name, checkpoints.read_state(path)) for _, path in found]
    assert [s.step for a, s in states if a == "attempt-1"][-1] == resumed_at
    assert [s.step for a, s in states if a == "attempt-2"][-1] == steps and all(
        s.step > resumed_at for a, s in states if a == "attempt-2")
    assert all(s.epoch == 0 and s.position == s.step * global_batch for _, s in states), \
        [(a, s.step, s.world_size, s.epoch, s.position) for a, s in states]
    sizes = [s.world_size for _, s in states]
    assert [w for i, w in enumerate(sizes) if i == 0 or sizes[i - 1] != w] == [2, 1, 2], sizes  # who wrote each
    # The workers converted exactly the checkpoints each resized group went on from (launch 2 started
    # on one worker from a checkpoint of one: nothing to convert).
    converted = [(path.parent.name, step) for step, path in found if (path / checkpoints.UNIVERSAL_TAG).is_dir()]
    assert converted == [("attempt-1", lost["step"]), ("attempt-2", grown["step"])], converted
    train_rows = int(re.search(r"\[sft\] data: train (\d+), ", first.text).group(1))
    assert steps * global_batch < train_rows
    world = scalars(target / "tensorboard", "train/world_size")
    assert sorted(world) == list(range(1, steps + 1)) and world[steps] == 2 and 1 in world.values()
    tested = json.loads((target / "test_metrics.json").read_text())
    assert tested["step"] == steps and tested["after"]["loss"] < tested["before"]["loss"]


class _Launch:
    """`sft-launch CONFIG --address <cluster> --output OUT [extra]` as its own process, its lines gathered
    as they come (they are the events waited on). Not in the test process: Ray caches its auth token per
    process, and an in-process launch of another test may have cached that of a private instance."""

    def __init__(self, cluster: Cluster, config: Path, out: Path, *extra: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", str(config), "--address", cluster.address,
                                      "--output", str(out), *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env={**cluster.env, "PYTHONUNBUFFERED": "1"})
        self.lines = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, event, deadline: float = float("inf")) -> None:
        _wait_for(event, self.proc, deadline)

    def end(self) -> int:
        code = self.proc.wait(timeout=600)
        self.reader.join(timeout=60)
        return code


def _written_by(out: Path, world_size: int, from_step: int = 0, count: int = 1, attempt: str = "attempt-*") -> bool:
    """`count` checkpoints of `out` (at `from_step` or later; of launch `attempt`) persisted by a group of
    `world_size` workers: their state files written, whether or not the driver has marked them complete yet."""
    from trainer import checkpoints

    found = 0
    for state in out.glob(f"checkpoints/{attempt}/step_*/{checkpoints.STATE_FILE}"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            written = json.loads(state.read_text())
            found += written["world_size"] == world_size and written["step"] >= from_step
    return found >= count


def _wait_for(event, proc, deadline: float = float("inf")) -> None:
    while not event():
        assert proc.poll() is None, "the launcher ended before the event the test waits for"
        assert time.monotonic() < deadline, "the event the test waits for did not come within 300 s"
        time.sleep(0.02)
