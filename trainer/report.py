"""The one seam between the worker loop and the orchestrator.

Every rank calls `Reporter.report` at the same points (evaluations, checkpoints, the test result)
with a typed message from trainer/messages.py; rank 0 calls `Reporter.log` for console lines and
`Reporter.track` for each step's metrics (the controller writes them to the run's tracker).
The Ray implementation lives in launcher/ray_job.py; `ListReporter` records calls for tests.
Never imports ray.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional, Protocol

from trainer.messages import Message, StepMetrics


class Reporter(Protocol):
    def report(self, message: Message, checkpoint: Optional[Path] = None) -> None:
        """Hand over a message and, optionally, this rank's checkpoint folder (persisted by step)."""

    def log(self, text: str, after_training: bool = False) -> None:
        """A console line (rank 0 only); `after_training`: shown after the last training report's lines."""

    def track(self, metrics: StepMetrics) -> None:
        """A step's metrics for the run's tracker (rank 0 only), without waiting."""


class ListReporter:
    """Keeps every report in memory; checkpoints are copied into `root/<step_...>` (single process)."""

    def __init__(self, root: Optional[Path] = None):
        self.calls: list[tuple[Message, Optional[Path]]] = []
        self.lines: list[str] = []
        self.tracked: list[StepMetrics] = []
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="sft-ckpt-"))

    def report(self, message, checkpoint=None):
        from trainer.checkpoints import dir_name, mark_complete

        kept = None
        if checkpoint is not None:
            kept = self.root / dir_name(message.step)
            shutil.copytree(checkpoint, kept, dirs_exist_ok=True)
            mark_complete(kept)
        self.calls.append((message, kept))

    def log(self, text, after_training=False):
        print(f"[sft] {text}", flush=True)
        self.lines.append(text)

    def track(self, metrics):
        self.tracked.append(metrics)

    def scalars(self, tag: str) -> dict[int, float]:
        """step -> value of one tracked tag, the last value of a step that came twice (a replay)."""
        return {m.step: m.scalars[tag] for m in self.tracked if tag in m.scalars}


class Phases:
    """Console lines that close each part of a long phase with its seconds (rank 0 passes its
    reporter; other ranks None, and say nothing)."""

    def __init__(self, reporter: Optional[Reporter]):
        self.reporter, self.last = reporter, time.perf_counter()

    def done(self, what: str) -> None:
        now = time.perf_counter()
        if self.reporter is not None:
            self.reporter.log(f"{what} ({now - self.last:.1f} s)")
        self.last = now
