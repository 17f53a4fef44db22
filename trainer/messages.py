"""What a worker reports and what the controller receives, as typed messages.

Workers build these, the reporting seam (trainer/report.py, launcher/ray_job.py) turns them into
plain dicts and back with `encode` / `decode`, and the controller reads the dataclasses. Nothing
else passes between the two sides. Imports only the stdlib.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Union


@dataclass(frozen=True)
class Where:
    """Where a rank runs."""
    node_id: str
    ip: str
    hostname: str
    pid: int


@dataclass(frozen=True)
class LogLine:
    """A console line from rank 0 (progress, data notes); delivered as it happens, not throttled."""
    text: str
    # Shown only once the last training report is in (the test phase's opening line): this line
    # travels faster than the report, whose evaluation line must come first.
    after_training: bool = False


@dataclass(frozen=True)
class StepMetrics:
    """Rank 0, after every training step: what the run's tracker records at that step (train/* scalars;
    at an evaluation also val/generations' table). Delivered through the queue at once, never waiting
    for the controller (a ray.train.report per step would); the controller is the one writer."""
    step: int
    scalars: dict = field(default_factory=dict)  # tag -> value
    texts: dict = field(default_factory=dict)  # tag -> markdown


@dataclass(frozen=True)
class TrainReport:
    """Every rank, after an evaluation or a checkpoint (then the report carries this rank's shard)."""
    step: int
    train_loss: float
    validation: dict = field(default_factory=dict)  # this step's validation metrics, when it evaluated
    final: bool = False  # the last step of the schedule: the test evaluation comes next
    stopped: bool = False  # a stop was asked for: this launch ends after this step
    # train.early_stopping's patience ran out at this step: the run ends here (final is set too) and
    # the test evaluation comes next.
    stopped_early: bool = False


@dataclass(frozen=True)
class TestResult:
    """Every rank, once: the test metrics before fine-tuning and from the final checkpoint."""
    step: int
    before: dict
    after: dict
    checkpoint: str = ""  # the checkpoint evaluated (and exported): test.checkpoint's final or best


@dataclass(frozen=True)
class BadInput:
    """Every rank, when the data or the config turned out bad past preflight: the user's to fix."""
    message: str


@dataclass(frozen=True)
class StorageFailure:
    """A rank, when a write it made was refused by the OS (trainer/storage.py): the run ends, with no
    restart (a restart would fail the same way). Delivered at once, like a LogLine."""
    what: str
    path: str  # where it was being written ("where" is the rank's place in encoded messages)
    error: str


@dataclass(frozen=True)
class WorkerFailure:
    """Made on the driver when worker processes died or raised: rank -> the error."""
    errors: dict  # one line each
    details: dict = field(default_factory=dict)  # the whole traceback each


@dataclass(frozen=True)
class GroupStarting:
    """Made in Ray Train's controller when it is about to start a worker group of `world_size` workers
    (the first, a restart after a failure, or a resize that grows the group back)."""
    world_size: int


@dataclass(frozen=True)
class GroupStarted:
    """Made in Ray Train's controller once a worker group runs: where each rank runs, by rank."""
    where: tuple  # Where

    @property
    def world_size(self) -> int:
        return len(self.where)


Message = Union[LogLine, StepMetrics, TrainReport, TestResult, BadInput, StorageFailure]
KINDS = {cls.__name__: cls for cls in (LogLine, StepMetrics, TrainReport, TestResult, BadInput, StorageFailure)}


@dataclass(frozen=True)
class Received:
    """One report as the controller receives it: each rank's message and place (by rank), and the
    checkpoint folder Ray persisted from every rank's part (None without one)."""
    messages: tuple
    where: tuple
    checkpoint: Optional[str] = None

    @property
    def first(self) -> Message:
        return self.messages[0]


def encode(message: Message, where: Optional[Where] = None) -> dict:
    out = {"kind": type(message).__name__, **dataclasses.asdict(message)}
    if where is not None:
        out["where"] = dataclasses.asdict(where)
    return out


def decode(data: dict) -> tuple[Message, Optional[Where]]:
    data = dict(data)
    kind, where = data.pop("kind"), data.pop("where", None)
    return KINDS[kind](**data), Where(**where) if where else None
