"""One launch per output directory: a lock file with a heartbeat lease, safe on shared storage.

`flock`/`fcntl` locks are unreliable on NFS and Lustre (and lost with the client that held them), so
the lock is a file created with O_CREAT|O_EXCL in the output directory, which is atomic on local
filesystems, NFSv3+ and Lustre. The file names its holder (host, pid, start time, Slurm job) and the
holder renews it: a thread sets its modification time every HEARTBEAT_S seconds. A lock is stale,
and the next launch takes it over, when
- its holder ran on this host and that process is gone (kill -9: taken over at once);
- it was written by the same Slurm job as this launch (a requeued job takes over its own lock);
- its heartbeat is older than LEASE_S (a lost node): the age is measured against a file this launch
  touches in the same directory, so both times come from the same (file server's) clock and the
  hosts' clocks need not agree. It relies on the storage showing another client's modification time
  within LEASE_S (NFS's attribute cache holds it for at most 60 s by default; opening the file
  revalidates it).
Never imports ray or deepspeed.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

from trainer.config import ConfigError

LOCK_FILE = ".sft-launch.lock"
HEARTBEAT_S = 10.0
LEASE_S = 120.0


@dataclass(frozen=True)
class Holder:
    """Who holds an output directory's lock."""
    host: str
    pid: int
    started: str  # local time of the holder's start, for people
    token: str  # this acquisition, to tell a taken-over lock from our own
    proc_start: str = ""  # the process's start time in clock ticks since boot (tells a reused pid)
    slurm_job: str = ""  # SLURM_JOB_ID of the holder, when it ran in a Slurm job

    def describe(self) -> str:
        job = f", Slurm job {self.slurm_job}" if self.slurm_job else ""
        return f"host {self.host}, pid {self.pid}, started {self.started}{job}"


def _proc_start(pid: int) -> str:
    """Field 22 of /proc/<pid>/stat (start time since boot); '' where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def this_process(environ=os.environ) -> Holder:
    return Holder(socket.gethostname(), os.getpid(), time.strftime("%Y-%m-%d %H:%M:%S"), secrets.token_hex(8),
                  _proc_start(os.getpid()), environ.get("SLURM_JOB_ID", ""))


def _alive_here(holder: Holder) -> bool:
    """Whether the holder, which ran on this host, still runs (the same process, not a reused pid)."""
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not holder.proc_start or _proc_start(holder.pid) == holder.proc_start


def _read(path: Path) -> tuple[Optional[Holder], float]:
    """The holder named in a lock file and the file's modification time (None: unreadable, e.g. a
    holder that died between creating and writing it)."""
    with open(path) as f:
        mtime = os.fstat(f.fileno()).st_mtime
        try:
            return Holder(**json.loads(f.read())), mtime
        except (ValueError, TypeError):
            return None, mtime


def _storage_now(directory: Path) -> float:
    """The storage's clock: the modification time of a file touched now in `directory`."""
    probe = directory / f".sft-clock-{secrets.token_hex(4)}"
    probe.touch()
    try:
        return probe.stat().st_mtime
    finally:
        probe.unlink(missing_ok=True)


def stale_reason(holder: Optional[Holder], age_s: float, me: Holder) -> Optional[str]:
    """Why a lock may be taken over, or None while its holder may still run. Pure."""
    if holder is None:
        return "it names no holder" if age_s > LEASE_S else None
    if me.slurm_job and holder.slurm_job == me.slurm_job:
        return f"it was written by this Slurm job ({me.slurm_job}) before a requeue"
    if holder.host == me.host and not _alive_here(holder):
        return f"its launch (pid {holder.pid}) no longer runs"
    if age_s > LEASE_S:
        return f"its heartbeat stopped {age_s:.0f} s ago (more than {LEASE_S:g} s)"
    return None


class RunLock:
    """Held by one launch from its preflight to its end."""

    def __init__(self, directory: Path, holder: Holder):
        self.path, self.holder = directory / LOCK_FILE, holder
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="sft-lock-heartbeat", daemon=True)

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(asdict(self.holder)))
        return True

    def acquire(self, say=lambda text: None) -> "RunLock":
        directory = self.path.parent
        for _ in range(5):
            if self._create():
                self._thread.start()
                return self
            try:
                holder, mtime = _read(self.path)
            except FileNotFoundError:
                continue  # released meanwhile
            age = _storage_now(directory) - mtime
            reason = stale_reason(holder, age, self.holder)
            if reason is None:
                raise ConfigError(
                    f"output_dir {directory} is in use by another sft-launch ({holder.describe()}; its lock "
                    f"{self.path} was renewed {max(age, 0):.0f} s ago). Wait for it to end, or choose another "
                    f"--output. A lock whose launch died is taken over: at once on the same host, after "
                    f"{LEASE_S:g} s without a heartbeat from another host.")
            # Take it over: move the stale file aside (one taker wins the rename), then check that what
            # was moved is the lock judged stale, not a fresh one another taker made meanwhile.
            aside = directory / f"{LOCK_FILE}.stale-{self.holder.token}"
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                continue
            moved, _ = _read(aside)
            if moved != holder:
                with contextlib.suppress(FileExistsError):
                    os.link(aside, self.path)  # put the fresh lock back (fails if yet another exists)
            aside.unlink(missing_ok=True)
            if moved == holder:
                say(f"taking over the lock of an earlier launch: {reason}")
        raise ConfigError(f"output_dir {directory}: could not take the lock {self.path} (other launches are "
                          f"starting there at the same time); try again")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):  # renewing needs no space; a failing disk ends the run elsewhere
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError, ValueError, TypeError):
            holder, _ = _read(self.path)
            if holder == self.holder:  # never remove a lock another launch took over
                self.path.unlink()


@contextlib.contextmanager
def held(directory: Path, say=lambda text: None) -> Iterator[RunLock]:
    """The output directory's lock, for the duration of the block (made if missing)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock = RunLock(directory, this_process()).acquire(say)
    except OSError as err:
        raise ConfigError(f"output_dir {directory}: not writable ({err.strerror})") from None
    try:
        yield lock
    finally:
        lock.release()
