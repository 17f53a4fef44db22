"""Slurm: render slurm/sft.sbatch for a config (a pure function) and submit it.

The template only starts and stops Ray around the launcher; everything else stays in sft-launch.
Imports only the stdlib and our config.
"""
from __future__ import annotations

import math
import shlex
import subprocess
from pathlib import Path

from trainer.config import ConfigError, RunConfig

TEMPLATE = Path(__file__).resolve().parents[1] / "slurm" / "sft.sbatch"


def sbatch_lines(cfg: RunConfig, config_path: Path, output_dir: Path) -> list[str]:
    s, sl = cfg.scaling, cfg.slurm
    cpus = sl.cpus_per_node if sl.cpus_per_node is not None else s.workers_per_node * s.cpus_per_worker
    gpus = sl.gpus_per_node if sl.gpus_per_node is not None else math.ceil(s.workers_per_node * (s.gpus_per_worker or 0))
    # --exclusive: Ray's fixed ports (client server, dashboard agent) would clash between two jobs on a node.
    lines = [f"--job-name={sl.job_name or 'sft-' + config_path.stem}", f"--nodes={s.nodes}", "--ntasks-per-node=1",
             "--exclusive",
             f"--cpus-per-task={cpus}", f"--time={sl.time}",
             f"--output={sl.log or output_dir / 'slurm-%j.out'}", "--open-mode=append",
             "--requeue", f"--signal=B:USR1@{sl.signal_grace_s}"]
    if s.is_elastic:
        # Slurm ends the whole allocation when one of its nodes fails; an elastic run goes on on the
        # others (the script starts each node's Ray once and never restarts a lost one).
        lines.append("--no-kill")
    if gpus:
        lines.append(f"--gpus-per-node={gpus}")
    if sl.partition:
        lines.append(f"--partition={sl.partition}")
    if sl.account:
        lines.append(f"--account={sl.account}")
    return [f"#SBATCH {line}" for line in lines]


def render(cfg: RunConfig, config_path: Path, python: str, extra_args: list[str], template: str) -> str:
    """The batch script for this run. `extra_args` (--set ..., --workers-per-node ...) reach the
    launcher inside the job unchanged, so the job trains exactly the config that was rendered."""
    output_dir = Path(cfg.output_dir).resolve()
    gpus = "--num-gpus=\"${SLURM_GPUS_ON_NODE:-0}\"" if any(
        "--gpus-per-node" in line for line in sbatch_lines(cfg, config_path, output_dir)) else ""
    values = {
        "SBATCH": "\n".join(sbatch_lines(cfg, config_path, output_dir)),
        "PYTHON": shlex.quote(python),
        "CONFIG": shlex.quote(str(config_path.resolve())),
        "OUTPUT": shlex.quote(str(output_dir)),
        "ARGS": " ".join(shlex.quote(a) for a in extra_args),
        "SETUP": cfg.slurm.setup.strip(),
        "GPUS": gpus,
    }
    out = template
    for key, value in values.items():
        out = out.replace(f"@@{key}@@", value)
    return out


def write_and_submit(cfg: RunConfig, config_path: Path, python: str, extra_args: list[str], submit: bool) -> Path:
    output_dir = Path(cfg.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    script = output_dir / "sft.sbatch"
    script.write_text(render(cfg, config_path, python, extra_args, TEMPLATE.read_text()))
    script.chmod(0o755)
    print(f"[sft] wrote {script}")
    if "--gpus-per-node" not in script.read_text():
        print("[sft] note: the job asks for no GPUs (scaling.gpus_per_worker is not set); set it, or "
              "slurm.gpus_per_node, to train on GPUs")
    if not submit:
        print(f"[sft] submit it with: sbatch {script}")
        return script
    try:
        proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    except FileNotFoundError:
        raise ConfigError("--submit: sbatch not found; is this a Slurm login node?") from None
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise ConfigError(f"--submit: sbatch refused {script}: {reason}")
    print(f"[sft] submitted job {proc.stdout.strip().split(';')[0]}; log: "
          f"{cfg.slurm.log or output_dir / 'slurm-<job>.out'}")
    return script
