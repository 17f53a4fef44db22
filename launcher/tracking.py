"""The tracking seam: where a run's metrics, tables and hyperparameters go. TensorBoard is the first backend.

One writer per run: the run's controller on the driver (for `--tune`, each trial's controller in its
Tune actor writes the trial's own run, a child of the search; the search's driver writes the
parent's hyperparameter table). The workers send their per-step metrics to the controller through
the non-blocking queue (trainer/messages.py `StepMetrics`); nothing else in the project writes
TensorBoard. A backend implements `Tracker`; `open_tracker` picks the backends of a run.

Resume: a relaunch (`--resume`) or a restarted worker group goes on from a checkpoint, and the
steps after it come again. The controller rewinds the run to the checkpoint's step (at the start of
a launch from one; on a `StepMetrics` step at or below the last one, a restart's replay): what was
logged past it is hidden (TensorBoard: a new event file whose purge_step hides it), so every step
shows once, with the values of the run that went on. Never imports deepspeed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Protocol

from trainer.storage import writing


class Tracker(Protocol):
    def scalars(self, values: dict[str, float], step: int) -> None:
        """Numbers at a step, by tag (train/loss, val/loss, test/exact_match ...)."""

    def text(self, tag: str, markdown: str, step: int) -> None:
        """A markdown text or table at a step (val/generations)."""

    def rewind(self, step: int) -> None:
        """The run goes on after `step` again: hide what was logged past it."""

    def hparams(self, values: dict, metrics: dict[str, float]) -> None:
        """A trial's searched values beside its final metrics (the search's comparison table)."""

    def artifact(self, path: Path) -> None:
        """A file or folder the run produced (the exported model, the summary)."""

    def close(self) -> None:
        """Everything written reaches storage."""


class TensorBoardTracker:
    """Event files under `log_dir`, opened at the first write (a run that writes nothing leaves
    none). Artifacts stay where the run wrote them: TensorBoard has no store for them."""

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

    def hparams(self, values: dict, metrics: dict[str, float]) -> None:
        writer = self._open()
        with writing("the TensorBoard hyperparameters", self.log_dir):
            writer.add_hparams(values, metrics, run_name="hparams")

    def artifact(self, path: Path) -> None:
        pass

    def close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            with writing("the TensorBoard events", self.log_dir):
                writer.close()


def open_tracker(log_dir: Path) -> Tracker:
    """The run's tracker: TensorBoard under `log_dir` (the trackers issue adds MLflow and W&B here)."""
    return TensorBoardTracker(log_dir)
