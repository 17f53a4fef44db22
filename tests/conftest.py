import json
import os
import socket

import pytest

from tests.e2e.common import launch
from tests.helpers import DATA, make_tokenizer, shouted_copy, tiny_config, tiny_llama, write_config


# pyproject's addopts run the suite in two pytest-xdist workers. The tests that start Ray (the e2e marker)
# run in two sequences, each in one worker, in collection order: the first shares the ZeRO-2 launch and its
# stop/resume (conftest's session fixtures: end to end, recovery, Slurm), the second holds the runs of
# their own (two nodes, the search, a classification task). The rest (unit, loop, spawned ranks, trackers:
# no Ray) go a module at a time to whichever worker is free. `-n 0` runs everything in one process.
RAY_TESTS = {"tests/e2e/test_e2e.py": "ray-shared", "tests/e2e/test_recovery.py": "ray-shared",
             "tests/slurm/": "ray-shared", "tests/e2e/test_multinode.py": "ray-own",
             "tests/e2e/test_tune.py": "ray-own", "tests/e2e/test_tasks_e2e.py": "ray-own"}


def ray_sequence(nodeid: str):
    return next((name for prefix, name in RAY_TESTS.items() if nodeid.startswith(prefix)), None)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class RaySequences(LoadScopeScheduling):
        """LoadScopeScheduling's unit of work is a scope: a Ray sequence, else a test module."""

        def _split_scope(self, nodeid: str) -> str:
            return ray_sequence(nodeid) or nodeid.split("::", 1)[0]

    return RaySequences(config, log)


def pytest_collection_modifyitems(config, items):
    stray = [item.nodeid for item in items if item.get_closest_marker("e2e") and not ray_sequence(item.nodeid)]
    if stray:
        raise pytest.UsageError(f"tests that start Ray (marked e2e) need a sequence in RAY_TESTS (tests/conftest.py): "
                                f"{stray}")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def process_group():
    """A one-process gloo group, as the orchestrator would have made it."""
    import torch.distributed as dist

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        # What torchrun or Ray Train would set, for the setup only: launches started later from this
        # process (tests share pytest workers) must not inherit them. DeepSpeed reads LOCAL_RANK later
        # too; Ray Train sets its own in every worker.
        os.environ["LOCAL_RANK"] = "0"
        keys = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        saved = {k: os.environ.get(k) for k in keys}
        os.environ.update(keys)
        try:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
            import deepspeed

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
            deepspeed.init_distributed()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    yield


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1 (SQLite store), shared by the tracking tests and the
    shared end-to-end run that reports to it."""
    from tests.helpers import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield server
    server.stop()


# The expensive end-to-end runs, shared by every module that needs them (e2e, multi-node, Slurm).

@pytest.fixture(scope="session")
def zero2(tmp_path_factory, tokenizer_dir, mlflow_server):
    tmp = tmp_path_factory.mktemp("zero2")
    # The trackers' shared launch too: a real MLflow server and W&B offline beside TensorBoard (the
    # resumed run and the Slurm and two-node runs of this config report to them as well).
    trackers = {"report_to": ["tensorboard", "mlflow", "wandb"], "wandb": {"mode": "offline", "project": "e2e"},
                "mlflow": {"tracking_uri": mlflow_server.uri, "experiment": "e2e"}}
    config = write_config(tmp / "tiny.yaml", tiny_config(tmp, tokenizer_dir, tracking=trackers))
    proc = launch(config, subprocess=True)  # its console is checked as a shell shows it
    assert proc.returncode == 0, proc.stderr[-2000:]
    return tmp / "run", config, proc


@pytest.fixture(scope="session")
def resumed(zero2, tmp_path_factory):
    """The ZeRO-2 run again, stopped by SIGTERM before its first step completes (the launcher as a real
    process, as `kill`, Kubernetes or a batch system's preemption signal it; Slurm's USR1 is sent in
    tests/slurm), then continued with --resume. While it trains, a second launch into the same output
    directory is refused. Returns the output directory, the stopped launch's console, exit code, summary,
    whether it tested, and the refused launch, then the resumed launch."""
    from tests.helpers import run_cli

    import signal
    import subprocess
    import sys

    out, config, _ = zero2
    target = tmp_path_factory.mktemp("resumed") / "run"
    proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", str(config), "--output", str(target)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "[sft] training: 2 worker(s)" in line:
            # Ray has started (ray.init replaced the SIGTERM handler once); the workers are starting.
            refused = run_cli(config, "--output", str(target))  # a second launch, same directory
            proc.send_signal(signal.SIGTERM)  # before step 1: the stop lands on a known step
    stopped = ("".join(lines), proc.wait(timeout=600),
               json.loads((target / "run_summary.json").read_text()) if (target / "run_summary.json").exists() else {},
               (target / "test_metrics.json").exists(), refused, proc.pid)
    again = launch(config, "--output", str(target), "--resume")
    assert again.returncode == 0, again.stderr[-2000:]
    return target, stopped, again


@pytest.fixture(scope="session")
def zero3(tmp_path_factory, tokenizer_dir):
    tmp = tmp_path_factory.mktemp("zero3")
    # Also a training mix of two sources (3:1), tested on the best checkpoint by validation.
    mix = [{"path": str(DATA), "weight": 3}, {"path": shouted_copy(tmp), "weight": 1}]
    raw = tiny_config(tmp, tokenizer_dir, model={"architecture": tiny_llama(3), "tokenizer": str(tokenizer_dir)},
                      finetune={"mode": "local", "train_last_layers": 2, "train_head": True},
                      deepspeed={"zero_stage": 3}, train={"max_steps": 10, "eval_every": 5, "save_every": 5},
                      data={"train_file": mix}, test={"checkpoint": "best"},
                      eval={"generate": {"num_examples": 3, "max_new_tokens": 8}})
    proc = launch(write_config(tmp / "tiny3.yaml", raw))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return tmp / "run", proc
