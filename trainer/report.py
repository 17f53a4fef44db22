"""The one seam between the worker loop and the orchestrator.

`Reporter.report` is called by every rank at the same points (evaluations and checkpoints).
The Ray implementation lives in launcher/ray_job.py; `ListReporter` records calls for tests.
Never imports ray.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Mapping, Optional, Protocol


class Reporter(Protocol):
    def report(self, metrics: Mapping[str, float], checkpoint: Optional[Path] = None,
               name: Optional[str] = None) -> None:
        """Hand over metrics and, optionally, this rank's checkpoint folder (persisted as `name`)."""


class ListReporter:
    """Keeps every report in memory; checkpoints are copied into `root/<name>` (single process)."""

    def __init__(self, root: Optional[Path] = None):
        self.calls: list[tuple[dict, Optional[Path]]] = []
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="sft-ckpt-"))

    def report(self, metrics, checkpoint=None, name=None):
        kept = None
        if checkpoint is not None:
            kept = self.root / (name or f"checkpoint_{len(self.calls)}")
            shutil.copytree(checkpoint, kept, dirs_exist_ok=True)
            from trainer.checkpoints import mark_complete
            mark_complete(kept)
        self.calls.append((dict(metrics), kept))
