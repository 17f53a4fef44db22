"""Helpers of the end-to-end tests: run sft-launch as a user does, read TensorBoard back.

`launch` runs the real command line. By default it does so in the test process (`cli.main`): the
Ray cluster, the workers, DeepSpeed and every file are as real as from a shell, minus a cold import
of the driver per run. `subprocess=True` starts it as its own process, for the runs whose console
and exit status are checked as a shell sees them; tests that signal the launcher start it
themselves."""
import subprocess as sp
import sys
from pathlib import Path

from tests.helpers import run_cli


def launch(config: Path, *extra: str, subprocess: bool = False, timeout: int = 600):
    if subprocess:
        proc = sp.run([sys.executable, "-m", "launcher.cli", str(config), *extra], capture_output=True, text=True,
                      timeout=timeout)
    else:
        proc = run_cli(config, *extra)
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-4000:])
    return proc


def scalars(logdir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)} if tag in acc.Tags()["scalars"] else {}


def texts(logdir: Path, tag: str) -> dict[int, str]:
    """TensorBoard text summaries (SummaryWriter.add_text) of a tag, by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    acc.Reload()
    if tag not in acc.Tags()["tensors"]:
        return {}
    return {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag)}


def descendants(roots: set[int]) -> set[int]:
    """The processes below `roots` (children, their children, ...), read from /proc now."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    found, frontier = set(), set(roots)
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def train_worker_pids(*roots: int) -> list[int]:
    """The Ray Train worker processes running now below `roots` (the launcher, or the Ray nodes of a
    cluster: Ray titles them ray::RayTrainWorker...), never another test's."""
    pids = []
    for pid in descendants(set(roots)):
        try:
            if b"RayTrainWorker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except OSError:
            pass
    return sorted(pids)
