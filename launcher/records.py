"""What the driver keeps and hands on, as typed records: an evaluation, a search trial's record and a
launch's outcome. The JSON files (run_summary.json, trials/<trial>/trial.json) are written from them
and read back into them; nothing on the driver passes these as dicts with agreed keys. Stdlib (and the
score of trainer/early_stopping.py) only.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal, Optional

from trainer.early_stopping import score


@dataclass(frozen=True)
class Evaluation:
    """One validation: its step, its metrics, and the checkpoint written at that step (once persisted)."""
    step: int
    metrics: dict[str, float]
    checkpoint: Optional[str] = None

    def score(self, metric: str, mode: str) -> Optional[float]:
        """Lower is better (trainer/early_stopping.py); None when the step did not evaluate `metric`."""
        return score(self.metrics, metric, mode)

    def value(self, metric: str) -> float:
        return float(self.metrics.get(metric, math.nan))

    def as_json(self) -> dict:
        """As run_summary.json and trial.json keep it: the step beside the metrics."""
        return {"step": self.step, **self.metrics, **({"checkpoint": self.checkpoint} if self.checkpoint else {})}

    @classmethod
    def from_json(cls, data: dict) -> "Evaluation":
        data = dict(data)
        step, checkpoint = data.pop("step"), data.pop("checkpoint", None)
        return cls(int(step), data, checkpoint)


def one_per_step(history: list[Evaluation], new: Evaluation) -> list[Evaluation]:
    """The history with `new` in place of any earlier evaluation of its step (a restart replays steps)."""
    return [e for e in history if e.step != new.step] + [new]


TrialStatus = Literal["running", "completed", "stopped early", "stopped", "failed"]
RECORD = "trial.json"  # in a trial's folder


@dataclass(frozen=True)
class TrialRecord:
    """A search trial as its own function records it (and the search reads it back)."""
    trial: str
    values: dict  # the searched keys' values
    status: TrialStatus = "running"
    steps: int = 0
    wall_s: float = 0.0
    history: tuple[Evaluation, ...] = ()
    final_checkpoint: Optional[str] = None
    error: Optional[str] = None  # what failed, for the console and tune_results
    bad_input: bool = False  # the error is the user's to fix (a ConfigError: error is its message)

    def last(self, metric: str) -> float:
        """The metric at the trial's last evaluation that has it (nan: none)."""
        values = [e.value(metric) for e in sorted(self.history, key=lambda e: e.step) if metric in e.metrics]
        return values[-1] if values else math.nan

    def with_evaluation(self, evaluation: Evaluation) -> "TrialRecord":
        return replace(self, history=tuple(one_per_step(list(self.history), evaluation)))

    def write(self, directory: Path) -> None:
        data = {**asdict(self), "history": [e.as_json() for e in self.history]}
        tmp = directory / f".{RECORD}.tmp"
        tmp.write_text(json.dumps(data, indent=1, default=str))
        tmp.replace(directory / RECORD)

    @classmethod
    def read(cls, directory: Path) -> Optional["TrialRecord"]:
        path = directory / RECORD
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        data["history"] = tuple(Evaluation.from_json(h) for h in data.get("history", ()))
        return cls(**data)


@dataclass(frozen=True)
class Outcome:
    """How a launch (a run or a search) ended, for the command line's exit code; `summary` is what
    run_summary.json holds."""
    status: Literal["completed", "stopped"]
    summary: dict = field(default_factory=dict)

    @property
    def stopped(self) -> bool:
        return self.status == "stopped"
