"""A real two-node Ray cluster on this machine (two `ray start` processes, token auth on), joined with
--address. That two ranks on two nodes give the single-node run's results is proven by the Slurm job
(tests/slurm: two nodes, a rank on each, the same test loss), which joins its cluster the same way; a
second launch here would only repeat it."""
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


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


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """Starts and stops only its own Ray processes (never `ray stop`, which ends every Ray here)."""
    tmp = tmp_path_factory.mktemp("cluster")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_USAGE_STATS_ENABLED": "0"}
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--object-store-memory=100000000", "--block"]
    procs = [subprocess.Popen([RAY, "start", "--head", f"--port={port}", "--include-dashboard=false",
                               f"--temp-dir={tmp / 'ray'}", *common], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 90
        while _alive_nodes(address, env) < 1:
            assert time.monotonic() < deadline, "the Ray head did not come up"
            time.sleep(1)
        procs.append(subprocess.Popen([RAY, "start", f"--address={address}", *common], env=env,
                                      start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        while _alive_nodes(address, env) < 2:  # wait until the second node has joined: no blind sleep
            assert time.monotonic() < deadline, "the second Ray node did not join"
            time.sleep(1)
        yield address, env
    finally:
        for proc in reversed(procs):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in procs:  # `ray start --block` takes ~30 s to end on SIGTERM; its group is ours alone
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


@pytest.mark.parametrize("extra, message", [
    (("--nodes", "2", "--workers-per-node", "64"), "cannot place 2 node(s) x 64 worker(s)")])
def test_asking_for_more_than_the_cluster_has_fails_fast(two_nodes, zero2, tmp_path, extra, message):
    address, env = two_nodes
    _, config, _ = zero2
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", str(config), "--address", address, *extra,
                           "--output", str(tmp_path / "run")],
                          env=env, capture_output=True, text=True, timeout=300)  # a hang would time out
    assert proc.returncode == 1 and message in proc.stderr
    assert "of its 2 node(s)" in proc.stderr and "CPUs" in proc.stderr
