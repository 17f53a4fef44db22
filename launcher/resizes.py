"""Elastic continuation on the driver: which worker-group starts were resizes, and what each cost.

Ray Train (ElasticScalingPolicy) restarts the group on fewer workers after a node is lost and grows it
back at a resize check; the driver learns of it only as messages: a failure, a group about to start,
a group started (where its ranks run), and the steps that follow. `GroupLog` turns them into the
run's resize records (run_summary.json `resizes`) and says whether a failure was absorbed by a resize
(it does not count against train.max_failures) or restarted the group on as many workers (it does).

A run may span launches (`--resume`), and a launch knows only its own groups: the driver keeps the
resizes so far beside each checkpoint it completes (`resizes.json`, `write_history`), and a resumed launch
starts from those of the checkpoint it resumes (`read_history`): the resizes on the way to that step, also
when the launch that made them died without a summary. Stdlib and trainer/ only.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal, Optional, Sequence

from trainer.config import ConfigError
from trainer.messages import Where

HISTORY = "resizes.json"  # in a checkpoint folder: the run's resizes up to that checkpoint, oldest first


@dataclass(frozen=True)
class Resize:
    """One resize of the worker group, as run_summary.json keeps it."""
    step: int  # the step the resized group went on from (the checkpoint it restored)
    from_world_size: int
    to_world_size: int
    node: str  # the node(s) that left (a shrink) or came (a growth), by Ray node id, comma-separated
    lost_s: float  # from the failure (or the resize decision) to the resized group's first step

    def as_json(self) -> dict:
        return asdict(self)


Start = Literal["first", "same size", "resize"]


@dataclass
class GroupLog:
    """The worker groups of one run, as the driver sees them come and go."""
    world_size: Optional[int] = None  # the current group's size (None before the first started)
    nodes: tuple[str, ...] = ()  # the node ids of the current group's ranks, by rank
    resizes: list[Resize] = field(default_factory=list)
    halted_at: Optional[float] = None  # when the current group stopped making progress (failure, resize)
    last_step: int = 0  # the last step the current group took
    pending: Optional[tuple[int, int, str, float]] = None  # a resize waiting for its first step

    def halted(self, now: float) -> None:
        """A failure came, or Ray decided to start a new group: the clock of the lost time starts (once)."""
        if self.halted_at is None:
            self.halted_at = now

    def started(self, where: tuple[Where, ...], now: float) -> Start:
        """A group runs on `where`: the first, one as large as the last (a restart), or a resize."""
        nodes = tuple(w.node_id for w in where)
        before, self.world_size, previous = self.world_size, len(nodes), self.nodes
        self.nodes = nodes
        if before is None:
            self.halted_at = None
            return "first"
        if before == len(nodes):
            self.halted_at = None
            return "same size"
        changed = set(previous) - set(nodes) if len(nodes) < before else set(nodes) - set(previous)
        self.pending = (before, len(nodes), ",".join(sorted(changed)), self.halted_at if self.halted_at is not None else now)
        self.halted_at = None
        return "resize"

    def stepped(self, step: int, now: float) -> Optional[Resize]:
        """A step of the current group: the first one after a resize completes its record."""
        self.last_step = step
        if self.pending is None:
            return None
        before, after, node, since = self.pending
        self.pending = None
        resize = Resize(step - 1, before, after, node, round(now - since, 1))
        self.resizes.append(resize)
        return resize


def write_history(checkpoint: Path, resizes: Sequence[Resize]) -> None:
    """The run's resizes up to `checkpoint`, beside it (before its completion marker: a checkpoint marked
    complete has its whole history). Nothing is written for a run that has none."""
    if not resizes:
        return
    tmp = Path(checkpoint) / f".{HISTORY}.tmp"
    tmp.write_text(json.dumps([r.as_json() for r in resizes], indent=1))
    tmp.replace(Path(checkpoint) / HISTORY)


def read_history(checkpoint: Path) -> list[Resize]:
    """The resizes of the launches that led to `checkpoint` ([] when it has none: no resize, or a run
    that was not elastic)."""
    path = Path(checkpoint) / HISTORY
    try:
        return [Resize(**{f.name: item[f.name] for f in fields(Resize)}) for item in json.loads(path.read_text())]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"--resume {checkpoint}: {HISTORY} is not the list of resizes the run wrote ({err!r}); "
                          f"delete it to resume without the record of the earlier launches' resizes") from None
