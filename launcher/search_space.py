"""The search space of `sft-launch --tune` (the config's tune.space): its distributions, the values
a search can give each key, and the run config of one trial.

Pure functions over the config: imports the stdlib and the config modules only, never ray (launcher/
tune.py turns the space into Ray Tune's). The schema checks the tune: section's own shape at load;
`check_space` checks the space itself, before any trial starts (launcher/tune.py: check_search).
"""
from __future__ import annotations

from typing import Any, Optional

from trainer.config import ConfigError, RunConfig
from trainer.config_load import from_dict, to_dict

# tune.space: a config key -> one distribution, written {kind: arguments}.
DISTRIBUTIONS = {
    "uniform": "[low, high]",
    "loguniform": "[low, high] (low > 0)",
    "randint": "[low, high] (integers; high excluded)",
    "choice": "[value, ...]",
    "grid": "[value, ...] (every value, in every repeat of the grid)",
}
# Keys a trial may not change: where and how the search itself runs.
UNSEARCHABLE = ("tune", "output_dir", "scaling", "slurm")
TRIAL = "tune trial"  # the `where` of a trial's config errors


def distribution(key: str, spec: Any) -> tuple[str, list]:
    """(kind, arguments) of one tune.space entry, checked for shape (the values are checked by
    check_space against the key's own rules)."""
    kinds = ", ".join(f"{{{k}: {v}}}" for k, v in DISTRIBUTIONS.items())
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ConfigError(f"tune.space.{key} must be one distribution, one of {kinds}; got {spec!r}")
    kind, args = next(iter(spec.items()))
    if not isinstance(args, (list, tuple)) or not args:
        raise ConfigError(f"tune.space.{key}: {kind} takes a list {DISTRIBUTIONS[kind]}, got {args!r}")
    if kind in ("uniform", "loguniform", "randint"):
        numeric = all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
        if len(args) != 2 or not numeric or not args[0] < args[1]:
            raise ConfigError(f"tune.space.{key}: {kind} takes {DISTRIBUTIONS[kind]} with low < high, got {args!r}")
        if kind == "loguniform" and args[0] <= 0:
            raise ConfigError(f"tune.space.{key}: loguniform needs low > 0, got {args!r}")
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise ConfigError(f"tune.space.{key}: randint takes two integers, got {args!r}")
    return kind, list(args)


def checked_values(kind: str, args: list) -> list:
    """The values of a distribution that the key's own checks must accept: every choice or grid
    value, both ends of a range (as the type a sample has)."""
    if kind in ("choice", "grid"):
        return list(args)
    if kind == "randint":
        return [args[0], args[1] - 1]
    return [float(args[0]), float(args[1])]


def _trial_raw(cfg: RunConfig, values: dict, output_dir: Optional[str]) -> dict:
    """`cfg` as plain data with each searched key set to its value and no tune section."""
    raw = to_dict(cfg)
    raw["tune"] = None
    for key, value in values.items():
        node, parts = raw, key.split(".")
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or parts[-1] not in node:
            raise ConfigError(f"tune.space.{key}: no such config key (a searched key is a dotted key of the "
                              f"run config, e.g. optim.lr or train.micro_batch_size)")
        node[parts[-1]] = value
    if output_dir is not None:
        raw["output_dir"] = output_dir
    return raw


def trial_config(cfg: RunConfig, values: dict, output_dir: Optional[str] = None) -> RunConfig:
    """The plain run config of one search trial: `cfg` with each searched key set to its value and
    no tune section, checked like any config."""
    return from_dict(_trial_raw(cfg, values, output_dir), TRIAL)


def check_space(cfg: RunConfig) -> None:
    """Every key of tune.space exists and accepts every value the search can give it (each choice and
    grid value, both ends of a range), through the normal config checks, before any trial starts."""
    for key, spec in cfg.tune.space.items():
        if key.split(".")[0] in UNSEARCHABLE:
            raise ConfigError(f"tune.space.{key}: {', '.join(UNSEARCHABLE)} are the search's own settings; "
                              f"a trial cannot change them")
        kind, args = distribution(key, spec)
        if kind == "grid" and cfg.tune.search_alg == "optuna":
            raise ConfigError(f"tune.space.{key}: grid values do not go with tune.search_alg: optuna (use choice)")
        for value in checked_values(kind, args):
            # The config's own message follows this `where`: what the search could give, then why not.
            from_dict(_trial_raw(cfg, {key: value}, None),
                      f"tune.space.{key}: the search could give it {value!r}, which the config refuses")
