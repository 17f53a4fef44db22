"""One launch per output directory (launcher/run_lock.py): the lock file, its holder and its lease."""
import json
import os
import subprocess
import sys
import time

import pytest

from launcher import run_lock
from trainer.config import ConfigError


def test_a_held_directory_is_refused_naming_the_holder_and_released_after(tmp_path):
    with run_lock.held(tmp_path) as lock:
        with pytest.raises(ConfigError, match=rf"output_dir {tmp_path} is in use by another sft-launch \(host "
                                              rf"{lock.holder.host}, pid {os.getpid()}, started "):
            run_lock.held(tmp_path).__enter__()
    assert not (tmp_path / run_lock.LOCK_FILE).exists()
    with run_lock.held(tmp_path):  # free again
        pass


def write_lock(tmp_path, **fields):
    me = run_lock.this_process()
    holder = {**me.__dict__, "token": "old", **fields}
    (tmp_path / run_lock.LOCK_FILE).write_text(json.dumps(holder))
    return run_lock.Holder(**holder)


def test_the_lock_of_a_launch_killed_on_this_host_is_taken_over_at_once(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    write_lock(tmp_path, pid=int(dead.stdout), proc_start="1")
    said = []
    with run_lock.held(tmp_path, said.append) as lock:
        assert json.loads((tmp_path / run_lock.LOCK_FILE).read_text())["token"] == lock.holder.token
    assert said and "no longer runs" in said[0]


def test_another_hosts_lock_holds_until_its_heartbeat_is_older_than_the_lease(tmp_path):
    write_lock(tmp_path, host="elsewhere", pid=1)
    with pytest.raises(ConfigError, match="host elsewhere, pid 1"):
        run_lock.held(tmp_path).__enter__()
    past = time.time() - run_lock.LEASE_S - 5
    os.utime(tmp_path / run_lock.LOCK_FILE, (past, past))
    with run_lock.held(tmp_path):
        pass


def test_a_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    write_lock(tmp_path, host="node7", pid=1, slurm_job="4242")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with run_lock.held(tmp_path):
        pass
    write_lock(tmp_path, host="node7", pid=1, slurm_job="4243")
    with pytest.raises(ConfigError, match="Slurm job 4243"):
        run_lock.held(tmp_path).__enter__()


def test_the_heartbeat_renews_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    with run_lock.held(tmp_path):
        path = tmp_path / run_lock.LOCK_FILE
        os.utime(path, (1, 1))
        deadline = time.time() + 10
        while path.stat().st_mtime < 10 and time.time() < deadline:
            time.sleep(0.05)
        assert path.stat().st_mtime > 10


def test_stale_reason_of_a_live_holder_on_this_host_is_none():
    me = run_lock.this_process()
    assert run_lock.stale_reason(me, 0.0, run_lock.this_process()) is None
    assert run_lock.stale_reason(None, 1.0, me) is None  # being written right now
    assert "names no holder" in run_lock.stale_reason(None, run_lock.LEASE_S + 1, me)
