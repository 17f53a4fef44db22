"""The tracking seam: where a run's metrics, tables, parameters and files go. TensorBoard is the first
backend; MLflow (launcher/tracking_mlflow.py) and Weights & Biases (launcher/tracking_wandb.py) are one
module each. `tracking.report_to` picks them; `open_tracker` opens them as one `Tracker`.

One writer per run: the run's controller on the driver (for `--tune`, each trial's controller in its
Tune actor writes the trial's own run, a child of the search's run, which the search's driver
writes). The workers send their per-step metrics to the controller through the non-blocking queue
(trainer/messages.py `StepMetrics`); nothing else in the project writes TensorBoard or calls a
tracker's client.

Resume: a relaunch (`--resume`) or a restarted worker group goes on from a checkpoint, and the
steps after it come again. The controller rewinds the run to the checkpoint's step: TensorBoard hides
what was logged past it (a new event file whose purge_step hides it), so every step shows once, with
the values of the run that went on. MLflow's points cannot be deleted and W&B drops steps at or below
its last one, so those backends are `Held`: a point reaches them only once a checkpoint at or after its
step has completed (`commit`); a rewind drops what is held, and a restart replays nothing into them.
Their client calls run on a thread of their own (`Background`): a slow or unreachable server never
stops the controller's report loop; it costs one console warning, the calls wait in a bounded buffer
and are sent when it answers again (what overflowed is counted in run_summary.json). Never imports
deepspeed.
"""
from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol

from launcher.console import say
from trainer.config import ConfigError, RunConfig
from trainer.storage import writing

IDENTITY = "tracking.json"  # in the output directory: each backend's run id, so a resume continues it


class Tracker(Protocol):
    def scalars(self, values: dict[str, float], step: int) -> None:
        """Numbers at a step, by tag (train/loss, val/loss, test/exact_match ...)."""

    def text(self, tag: str, markdown: str, step: int) -> None:
        """A markdown text or table at a step (val/generations)."""

    def rewind(self, step: int) -> None:
        """The run goes on after `step` again: what was logged past it does not count."""

    def commit(self, step: int) -> None:
        """A checkpoint of `step` completed: what was logged up to it is final."""

    def params(self, values: dict, tags: dict[str, str]) -> None:
        """The run's settings (the resolved config, flattened to dotted keys) and facts about it (world
        size, parameter counts, model and data identity)."""

    def hparams(self, values: dict, metrics: dict[str, float]) -> None:
        """A trial's searched values beside its final metrics (the search's comparison table)."""

    def artifact(self, path: Path) -> None:
        """A file or folder the run produced (the summary, the generated answers, the model)."""

    def flush(self, timeout_s: float) -> dict[str, int]:
        """Wait (up to `timeout_s`) until everything is sent; returns the points each backend lost."""

    def close(self) -> None:
        """Everything written reaches storage."""


class TensorBoardTracker:
    """Event files under `log_dir`, opened at the first write (a run that writes nothing leaves
    none). Artifacts and parameters stay where the run wrote them: TensorBoard has no store for them."""

    name = "tensorboard"

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self._writer = None
        self._purge_from: Optional[int] = None  # the next event file hides what was logged from here on

    def _open(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            with writing("the TensorBoard events", self.log_dir):
                self._writer = SummaryWriter(str(self.log_dir), purge_step=self._purge_from)
            self._purge_from = None
        return self._writer

    def scalars(self, values: dict[str, float], step: int) -> None:
        writer = self._open()
        with writing("the TensorBoard events", self.log_dir):
            for tag, value in values.items():
                writer.add_scalar(tag, value, step)

    def text(self, tag: str, markdown: str, step: int) -> None:
        from tensorboard.plugins.text.summary_v2 import text_pb

        writer = self._open()
        with writing("the TensorBoard events", self.log_dir):
            # add_text would file the table under "<tag>/text_summary"
            writer.file_writer.add_summary(text_pb(tag, markdown), step)

    def rewind(self, step: int) -> None:
        self.close()
        self._purge_from = step + 1

    def commit(self, step: int) -> None:
        pass

    def params(self, values: dict, tags: dict[str, str]) -> None:
        pass

    def hparams(self, values: dict, metrics: dict[str, float]) -> None:
        writer = self._open()
        with writing("the TensorBoard hyperparameters", self.log_dir):
            writer.add_hparams(values, metrics, run_name="hparams")

    def artifact(self, path: Path) -> None:
        pass

    def flush(self, timeout_s: float) -> dict[str, int]:
        return {}

    def close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            with writing("the TensorBoard events", self.log_dir):
                writer.close()


class Held:
    """An append-only backend (MLflow, W&B) behind the checkpoints: points wait until a checkpoint at or
    after their step completes, so a replayed step is never sent twice. Pure bookkeeping, in the
    controller's thread; what is released goes to `inner` (a Background)."""

    def __init__(self, inner):
        self.inner, self.name = inner, inner.name
        self.committed = 0  # the last step a checkpoint completed at (or the run started from)
        self.held: list[tuple[int, Callable[[], None]]] = []

    def _hold(self, step: int, call: Callable[[], None]) -> None:
        if step <= self.committed:  # final already (a test metric of the tested step, say)
            call()
        else:
            self.held.append((step, call))

    def scalars(self, values: dict[str, float], step: int) -> None:
        self._hold(step, lambda: self.inner.scalars(values, step))

    def text(self, tag: str, markdown: str, step: int) -> None:
        self._hold(step, lambda: self.inner.text(tag, markdown, step))

    def rewind(self, step: int) -> None:
        """The run goes on from a checkpoint of `step`: what is held past it will come again; up to it
        is final."""
        self.held = [(s, call) for s, call in self.held if s <= step]
        self.commit(step)

    def commit(self, step: int) -> None:
        ready = [call for s, call in self.held if s <= step]
        self.held = [(s, call) for s, call in self.held if s > step]
        self.committed = max(self.committed, step)
        for call in ready:
            call()

    def params(self, values: dict, tags: dict[str, str]) -> None:
        self.inner.params(values, tags)

    def hparams(self, values: dict, metrics: dict[str, float]) -> None:
        self.inner.hparams(values, metrics)

    def artifact(self, path: Path) -> None:
        self.inner.artifact(path)

    def flush(self, timeout_s: float) -> dict[str, int]:
        return self.inner.flush(timeout_s)

    def close(self) -> None:
        self.held.clear()  # past the last checkpoint: a resume replays these steps
        self.inner.close()


class Background:
    """A backend's client calls on a thread of their own, so that nothing a tracker does can slow or
    stop the run. A call that fails (a server gone, a locked SQLite file) is retried every `retry_s`
    with the calls behind it waiting; the console says so once, and again when it answers. At most
    `limit` calls wait: past that the oldest are dropped and counted (run_summary.json `tracking.lost`)."""

    def __init__(self, backend, limit: int = 100_000, retry_s: float = 5.0):
        self.backend, self.name = backend, backend.name
        self.limit, self.retry_s = limit, retry_s
        self.pending: deque[Callable[[], None]] = deque()
        self.lost = 0
        self.failing: Optional[str] = None
        self._wake = threading.Condition()
        self._closing = False
        self._sending = False  # pending[0] is being sent: what overflows is the oldest call behind it
        self._thread = threading.Thread(target=self._run, name=f"tracking-{self.name}", daemon=True)
        self._thread.start()

    def _put(self, call: Callable[[], None]) -> None:
        with self._wake:
            if len(self.pending) >= self.limit:
                del self.pending[1 if self._sending else 0]
                self.lost += 1
            self.pending.append(call)
            self._wake.notify_all()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self.pending and not self._closing:
                    self._wake.wait()
                if not self.pending:
                    return
                call, self._sending = self.pending[0], True
            try:
                call()
            except Exception as err:  # the client's: a server gone, a timeout, a locked store
                with self._wake:
                    self._sending = False
                if self.failing is None:
                    text = redact(str(err).strip().splitlines()[0][:300]) if str(err).strip() else ""
                    self.failing = f"{type(err).__name__}: {text}"
                    say(f"tracking: {self.backend.where} does not answer ({self.failing}); the run goes on, and "
                        f"its points wait (up to {self.limit:,} calls) until it answers again")
                with self._wake:
                    if self._closing:  # close() has given up on what is left
                        return
                    self._wake.wait(self.retry_s)
                continue
            with self._wake:
                self.pending.popleft()
                self._sending = False
                self._wake.notify_all()
            if self.failing is not None:
                self.failing = None
                say(f"tracking: {self.backend.where} answers again; the waiting points are being sent")

    def scalars(self, values: dict[str, float], step: int) -> None:
        values, stamp = dict(values), int(time.time() * 1000)
        self._put(lambda: self.backend.scalars(values, step, stamp))

    def text(self, tag: str, markdown: str, step: int) -> None:
        self._put(lambda: self.backend.text(tag, markdown, step))

    def rewind(self, step: int) -> None:
        pass  # Held keeps what a rewind drops from ever reaching here

    def commit(self, step: int) -> None:
        pass

    def params(self, values: dict, tags: dict[str, str]) -> None:
        values, tags = dict(values), dict(tags)
        self._put(lambda: self.backend.params(values, tags))

    def hparams(self, values: dict, metrics: dict[str, float]) -> None:
        pass  # the trial's searched values are its parameters already

    def artifact(self, path: Path) -> None:
        self._put(lambda: self.backend.artifact(Path(path)))

    def flush(self, timeout_s: float) -> dict[str, int]:
        deadline = time.monotonic() + timeout_s
        with self._wake:
            while self.pending and time.monotonic() < deadline:
                self._wake.wait(min(0.2, max(0.0, deadline - time.monotonic())))
            unsent = len(self.pending)
        return {self.name: self.lost + unsent} if self.lost or unsent else {}

    def close(self, timeout_s: float = 30.0) -> None:
        left = self.flush(timeout_s)
        with self._wake:
            self._closing = True
            self._wake.notify_all()
        self._thread.join(timeout=5)
        if left:
            say(f"tracking: {self.backend.where} did not take {left[self.name]:,} call(s) before the end")
        try:
            self.backend.close()
        except Exception as err:
            say(f"tracking: closing {self.backend.where} failed ({type(err).__name__}); what it took is kept")


class Trackers:
    """Several backends as one Tracker."""

    def __init__(self, members: list):
        self.members = members

    def scalars(self, values, step):
        for m in self.members:
            m.scalars(values, step)

    def text(self, tag, markdown, step):
        for m in self.members:
            m.text(tag, markdown, step)

    def rewind(self, step):
        for m in self.members:
            m.rewind(step)

    def commit(self, step):
        for m in self.members:
            m.commit(step)

    def params(self, values, tags):
        for m in self.members:
            m.params(values, tags)

    def hparams(self, values, metrics):
        for m in self.members:
            m.hparams(values, metrics)

    def artifact(self, path):
        for m in self.members:
            m.artifact(path)

    def flush(self, timeout_s: float) -> dict[str, int]:
        lost: dict[str, int] = {}
        for m in self.members:
            lost.update(m.flush(timeout_s))
        return lost

    def close(self):
        for m in self.members:
            m.close()

    @property
    def runs(self) -> dict[str, dict]:
        """Each backend's run (where, and its identity), for the summary."""
        return {m.name: {"where": m.inner.backend.where, **m.inner.backend.identity}
                for m in self.members if isinstance(m, Held)}

    def as_parent(self) -> Parent:
        """This run as the parent of a search's trials."""
        runs = {m.name: m.inner.backend.as_parent for m in self.members if isinstance(m, Held)}
        return Parent(mlflow=runs.get("mlflow"), wandb_group=runs.get("wandb", {}).get("group"))

    def describe(self) -> str:
        """The startup line: where each tracker writes."""
        parts = [f"TensorBoard in {m.log_dir}" if isinstance(m, TensorBoardTracker) else
                 f"{m.inner.backend.where} (run {m.inner.backend.identity['run_id']})" for m in self.members]
        return "tracking: " + ("; ".join(parts) if parts else "off (tracking.report_to: none)")


@dataclass(frozen=True)
class Parent:
    """A search's own run, which each trial's run is filed under (MLflow: a nested run; W&B: a group)."""
    mlflow: Optional[dict] = None  # {"tracking_uri", "experiment_id", "run_id"}
    wandb_group: Optional[str] = None


def read_identity(out: Path) -> dict:
    try:
        return json.loads((out / IDENTITY).read_text())
    except (OSError, ValueError):
        return {}


def write_identity(out: Path, backend: str, value: dict) -> None:
    data = {**read_identity(out), backend: value}
    tmp = out / f".{IDENTITY}.tmp"
    with writing("the tracking identity", tmp):
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(out / IDENTITY)


def missing_library(cfg: RunConfig) -> Optional[str]:
    """A ConfigError message when a chosen backend's library is not installed."""
    import importlib.util

    for name, module in (("mlflow", "mlflow"), ("wandb", "wandb")):
        if name in cfg.tracking.report_to and importlib.util.find_spec(module) is None:
            return (f"tracking.report_to: {name} needs the {module} package, which is not installed; install "
                    f"the extra with: pip install 'sft[{name}]' (or remove {name} from tracking.report_to)")
    return None


def open_tracker(cfg: RunConfig, out: Path, parent: Optional[Parent] = None, child: Optional[str] = None,
                 search: bool = False) -> Trackers:
    """The run's trackers (tracking.report_to): TensorBoard under <out>/tensorboard, the others held
    behind checkpoints and on their own threads. `search`: a search's own run; `parent`/`child`: a
    trial's run (its trial id), filed under the search's. A backend that cannot start (a library
    missing, a server that does not answer) is bad input: ConfigError, before any worker starts."""
    problem = missing_library(cfg)
    if problem:
        raise ConfigError(problem)
    members: list = []
    for name in cfg.tracking.report_to:
        if name == "tensorboard":
            members.append(TensorBoardTracker(out / "tensorboard"))
        elif name == "mlflow":
            from launcher.tracking_mlflow import MlflowBackend

            members.append(Held(Background(MlflowBackend(cfg, out, parent, child, search))))
        elif name == "wandb":
            from launcher.tracking_wandb import WandbBackend

            members.append(Held(Background(WandbBackend(cfg, out, parent, child, search))))
    return Trackers(members)


def flatten(values: dict, prefix: str = "") -> dict[str, object]:
    """A nested config as dotted keys (optim.lr); lists and other values as they are."""
    flat: dict[str, object] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def redact(text: Optional[str]) -> Optional[str]:
    """A URI, or any text that quotes one (a client's error), without the credentials it may hold
    (scheme://user:password@host)."""
    import re

    return re.sub(r"(\w[\w+.-]*://)[^/\s@]+@", r"\1***@", text) if text else text


def public_config(cfg: RunConfig) -> dict:
    """The resolved config as files and trackers show it: without the credentials a URI may hold."""
    from trainer.config_load import to_dict

    data = to_dict(cfg)
    data["tracking"]["mlflow"]["tracking_uri"] = redact(cfg.tracking.mlflow.tracking_uri)
    return data


def run_params(cfg: RunConfig) -> dict[str, object]:
    """The resolved config as a tracker's parameters: dotted keys, no credentials."""
    return flatten(public_config(cfg))
