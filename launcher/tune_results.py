"""What a search leaves, as pure functions over the trials' records (`trials/<trial>/trial.json`):
each trial's final status, the console lines, the best trial, tune_results.csv and TensorBoard HParams.
Imports no Ray (tests read them without a cluster)."""
from __future__ import annotations

import csv
import math
from dataclasses import replace
from pathlib import Path

from launcher.records import RECORD, TrialRecord
from trainer.config import ConfigError, TuneConfig

TRIALS = "trials"  # <output_dir>/trials/<trial id>/: one run each
EXPERIMENT = "tune"  # <output_dir>/tune/: Ray Tune's own state (what --tune --resume restores)
EXIT_REASONS = {"completed": "ran its whole schedule", "stopped early": "stopped by ASHA",
                "stopped": "stopped on request (continue with --tune --resume)", "failed": "failed"}


def trial_dir(out: Path, trial_id: str) -> Path:
    return out / TRIALS / trial_id


def trial_status(out: Path, trial_id: str, errored: bool) -> TrialRecord:
    """A trial's record with its final status. A trial ends its record itself (completed, stopped early
    by ASHA through its stop file, stopped, failed); one whose record still says running was ended from
    outside: by Tune (stopped early) or by an error its function could not record (failed)."""
    record = TrialRecord.read(trial_dir(out, trial_id)) or TrialRecord(trial_id, {})
    if record.status == "running":
        return replace(record, status="failed" if errored else "stopped early")
    return record


def collect(out: Path) -> list[TrialRecord]:
    """Every trial's record, in the order Tune created them."""
    found = sorted((out / TRIALS).glob(f"*/{RECORD}")) if (out / TRIALS).is_dir() else []
    return [trial_status(out, p.parent.name, errored=False) for p in found]


def values_text(values: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def trial_line(record: TrialRecord, tune: TuneConfig) -> str:
    history = sorted(record.history, key=lambda e: e.step)
    shown = (f"val {tune.metric} {history[-1].value(tune.metric):.4g} at step {history[-1].step}"
             if history and tune.metric in history[-1].metrics else "no evaluation")
    why = EXIT_REASONS[record.status]
    error = f" ({record.error})" if record.status == "failed" and record.error else ""
    return (f"trial {record.trial} {record.status} after step {record.steps}: {values_text(record.values)}; "
            f"{shown}; {why}{error}")


def pick_best(tune: TuneConfig, records: list[TrialRecord]) -> TrialRecord:
    """The best trial by its final validation value among the trials that ran their whole schedule
    (their final checkpoint is the one the test evaluates)."""
    done = [r for r in records if r.status == "completed" and not math.isnan(r.last(tune.metric))]
    if not done:
        raise ConfigError("tune: no trial completed its schedule, so there is no trial to test; see "
                          "tune_results.csv (a grace_period shorter than the schedule, or a wider space)")
    sign = 1 if tune.mode == "min" else -1
    return min(done, key=lambda r: sign * r.last(tune.metric))


def top_lines(tune: TuneConfig, records: list[TrialRecord], top: int = 5) -> list[str]:
    """The console's table of the best trials: those that ran their whole schedule first (the best is
    chosen among them), then the others."""
    sign = 1 if tune.mode == "min" else -1
    ranked = sorted(records, key=lambda r: (r.status != "completed", math.isnan(r.last(tune.metric)),
                                            sign * r.last(tune.metric)))
    return [f"top trials by final val {tune.metric} ({tune.mode}):"] + [
        f"  {i}. {r.trial}  {tune.metric} {r.last(tune.metric):.4g}  {r.status:<13} step {r.steps:<5} "
        f"{r.wall_s:.0f} s  {values_text(r.values)}" for i, r in enumerate(ranked[:top], 1)]


def write_results(out: Path, tune: TuneConfig, records: list[TrialRecord]) -> Path:
    """tune_results.csv: one row per trial; the metric at each evaluation step in its own column."""
    steps = sorted({e.step for r in records for e in r.history})
    keys = list(tune.space)
    path = out / "tune_results.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial", "status", "steps", "wall_s", *keys, f"final_{tune.metric}",
                         *[f"{tune.metric}@{s}" for s in steps]])
        for r in records:
            at = {e.step: e.metrics.get(tune.metric) for e in r.history}
            writer.writerow([r.trial, r.status, r.steps, r.wall_s, *[r.values.get(k) for k in keys],
                             r.last(tune.metric), *[at.get(s, "") for s in steps]])
    return path


def write_hparams(out: Path, tune: TuneConfig, records: list[TrialRecord]) -> None:
    """Each trial's searched values beside its final metric, in the trial's run (TensorBoard HParams:
    `tensorboard --logdir <output_dir>` compares them; MLflow and W&B have them as the trial's
    parameters already)."""
    from launcher.tracking import TensorBoardTracker

    for r in records:
        values = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in r.values.items()}
        final = r.last(tune.metric)
        tracker = TensorBoardTracker(trial_dir(out, r.trial) / "tensorboard")
        try:
            tracker.hparams({**values, "status": r.status},
                            {f"hparam/val_{tune.metric}": final if not math.isnan(final) else float("inf")})
        finally:
            tracker.close()
