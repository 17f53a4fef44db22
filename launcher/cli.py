"""`sft-launch`: the command line. Parses arguments, loads the config, and hands over to the controller.

Bad input (a ConfigError) is printed as one paragraph, without a traceback, with exit code 2.
Imports nothing heavy at module level: `--help` and config errors answer at once.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Optional

import yaml

from trainer.config import ConfigError, RunConfig
from trainer.config_load import load_config, to_dict

EXIT_CONFIG = 2  # bad input: config, data, CLI
EXIT_FAILED = 1  # the run failed (a worker error, the cluster, a stop that outran its grace)
EXIT_STOPPED = 75  # stopped on a signal after writing a checkpoint: continue with --resume
EXIT_INTERRUPTED = 130  # aborted (a second Ctrl-C)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sft-launch",
        description="Supervised fine-tuning on a Ray cluster with DeepSpeed ZeRO workers.")
    p.add_argument("config", help="YAML run config (see configs/)")
    p.add_argument("--nodes", type=int, help="nodes to spread the workers over (scaling.nodes)")
    p.add_argument("--workers-per-node", type=int, help="workers on each node (scaling.workers_per_node)")
    p.add_argument("--address", help="an existing Ray cluster ('auto' or host:port; default: RAY_ADDRESS, "
                                     "else a private local instance)")
    p.add_argument("--output", help="output directory (output_dir)")
    p.add_argument("--resume", nargs="?", const="", metavar="PATH",
                   help="continue from the latest complete checkpoint in output_dir, or from PATH")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, typed like YAML (repeatable), e.g. --set optim.lr=3e-5")
    p.add_argument("--tune", action="store_true",
                   help="run the config's hyperparameter search (tune:) instead of one run; with --resume, "
                        "continue the search in output_dir")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config and the plan; start nothing")
    p.add_argument("--verbose", action="store_true",
                   help="show everything the workers and libraries print (Ray's per-worker prefixes, "
                        "progress bars, DeepSpeed notices)")
    slurm = p.add_argument_group("Slurm")
    slurm.add_argument("--slurm", action="store_true",
                       help="write <output_dir>/sft.sbatch for this config instead of running it here")
    slurm.add_argument("--submit", action="store_true", help="with --slurm: also submit it with sbatch")
    slurm.add_argument("--partition", help="slurm.partition")
    slurm.add_argument("--account", help="slurm.account")
    slurm.add_argument("--time", help="slurm.time, e.g. 04:00:00")
    return p


def resolve(args: argparse.Namespace) -> RunConfig:
    overrides = list(args.set)
    if args.nodes is not None:
        overrides.append(f"scaling.nodes={args.nodes}")
    if args.workers_per_node is not None:
        overrides.append(f"scaling.workers_per_node={args.workers_per_node}")
    # Text options are quoted, so that YAML keeps `--time 12:00:00` or `--account 1234` as text.
    if args.output is not None:
        overrides.append(f"output_dir={json.dumps(args.output)}")
    for key in ("partition", "account", "time"):
        if getattr(args, key) is not None:
            overrides.append(f"slurm.{key}={json.dumps(getattr(args, key))}")
    cfg = load_config(args.config, overrides)
    if cfg.output_dir is None:
        cfg = dataclasses.replace(cfg, output_dir=str(Path("runs") / Path(args.config).stem))
    return cfg


def cache_dir() -> str:
    return os.environ.get("SFT_CACHE_DIR") or str(Path.home() / ".cache" / "sft")


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        cfg = resolve(args)
        if args.submit and not args.slurm:
            raise ConfigError("--submit goes with --slurm")
        if args.tune and args.resume:
            raise ConfigError("--tune --resume continues the search in output_dir; it takes no checkpoint PATH")
        if args.tune:
            from launcher.tune import check_search

            check_search(cfg, args.resume is not None, Path(cfg.output_dir).resolve())
        if args.slurm:
            from launcher.slurm import write_and_submit

            passed = [a for item in args.set for a in ("--set", item)] + (["--tune"] if args.tune else [])
            if args.workers_per_node is not None:
                passed += ["--workers-per-node", str(args.workers_per_node)]
            write_and_submit(cfg, Path(args.config), sys.executable, passed, args.submit)
            return 0
        if args.dry_run:
            from launcher.plan import describe, make_plan

            print(yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
            print("---")
            print(describe(make_plan(cfg, cache_dir()), cfg))
            if args.tune:
                from launcher.tune import describe_search

                describe_search(cfg.tune, resume=False)
            return 0
        from launcher.controller import LaunchOptions

        options = LaunchOptions(cache_dir(), args.address, args.verbose)
        if args.tune:
            from launcher.tune import search

            outcome = search(cfg, options, args.resume is not None)
        else:
            from launcher.controller import launch

            outcome = launch(cfg, options, args.resume)
        return EXIT_STOPPED if outcome.stopped else 0
    except ConfigError as err:
        print(f"sft-launch: error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        print("sft-launch: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        from launcher.controller import StorageFailed
        from launcher.ray_job import LaunchError

        if isinstance(err, (LaunchError, StorageFailed)):
            print(f"sft-launch: the run failed: {err}", file=sys.stderr)
            return EXIT_FAILED
        raise


if __name__ == "__main__":
    sys.exit(main())
