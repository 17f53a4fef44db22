"""Early stopping and the best checkpoint, as pure functions over validation metrics.

Which validation metric makes a checkpoint "best" (train.early_stopping's metric and mode when set,
else validation loss), and the patience counter the loop keeps in its TrainState. Every rank runs
these on the same all-reduced metrics, so every rank takes the same decision. Imports only the stdlib.
"""
from __future__ import annotations

from typing import Mapping, Optional

from trainer.config import ConfigError, EarlyStoppingConfig, RunConfig


def selection(cfg: RunConfig) -> tuple[str, str]:
    """(metric, mode) that ranks checkpoints: early stopping's when set, else the validation loss."""
    stopping = cfg.train.early_stopping
    return (stopping.metric, stopping.mode) if stopping is not None else ("loss", "min")


def score(validation: Mapping[str, float], metric: str, mode: str) -> Optional[float]:
    """The metric as lower-is-better (negated for mode max); None when the step did not evaluate it."""
    value = validation.get(metric)
    if value is None:
        return None
    return float(value) if mode == "min" else -float(value)


def counted(cfg: EarlyStoppingConfig) -> str:
    """What a saved best value measures: "metric/mode"."""
    return f"{cfg.metric}/{cfg.mode}"


def carry_over(best: Optional[float], bad_evaluations: int, best_of: Optional[str],
               cfg: EarlyStoppingConfig) -> tuple[Optional[float], int]:
    """The saved best and patience count when a resume keeps the metric and mode; counting starts
    again when it changes them (a best loss is no bar for an accuracy). A checkpoint from before
    best_of was saved keeps its values."""
    if best_of is None or best_of == counted(cfg):
        return best, bad_evaluations
    return None, 0


def advance(best: Optional[float], bad_evaluations: int, validation: Mapping[str, float],
            cfg: EarlyStoppingConfig) -> tuple[float, int]:
    """After one evaluation: the best value so far and the evaluations in a row without an
    improvement by more than min_delta. The run stops when the count reaches cfg.patience."""
    if cfg.metric not in validation:
        raise ConfigError(f"train.early_stopping.metric is {cfg.metric!r}, but the validation reports "
                          f"{', '.join(sorted(validation))}; choose one of those")
    value = float(validation[cfg.metric])
    if best is None:
        return value, 0
    improved = value < best - cfg.min_delta if cfg.mode == "min" else value > best + cfg.min_delta
    return (value, 0) if improved else (best, bad_evaluations + 1)
