"""Weights & Biases behind the tracking seam (tracking.report_to: [wandb]; pip install 'sft[wandb]').

`tracking.wandb.project` / `entity` / `name` / `tags` / `mode`, each else its WANDB_* variable
(WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE; project default "sft", mode default online). `mode: offline`
writes the run under the output directory (or WANDB_DIR) for `wandb sync` later, on a machine without
internet. One run per output directory: its id is kept in <output_dir>/tracking.json, so `--resume`,
a restart and a Slurm requeue continue it (W&B's resume="allow"). W&B drops a step at or below its
last one: the seam sends a point only once its checkpoint completed (launcher/tracking.py, Held), and
metrics of an earlier step (the test metrics of the best checkpoint, say) go to the run's summary. A
search's trials form a W&B group with the search's own run. Only the launcher's driver side imports
this module.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Optional

from launcher.tracking import Parent, read_identity, write_identity
from trainer.config import ConfigError, RunConfig

DEFAULT_PROJECT = "sft"


class WandbBackend:
    """The calls of one W&B run (on the Background thread, except __init__)."""

    name = "wandb"

    def __init__(self, cfg: RunConfig, out: Path, parent: Optional[Parent] = None, child: Optional[str] = None,
                 search: bool = False):
        import wandb

        w = cfg.tracking.wandb
        out = Path(out).resolve()
        known = read_identity(out).get(self.name, {})
        run_id = known.get("run_id") or secrets.token_hex(4)  # W&B run ids: 8 characters [a-z0-9]
        mode = w.mode or os.environ.get("WANDB_MODE") or "online"
        project = w.project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
        # A search's trials and its own run form one group, named by the search's run.
        group = parent.wandb_group if parent is not None and parent.wandb_group else known.get("group")
        if group is None and search:
            group = f"{out.name}-{run_id}"
        directory = Path(os.environ.get("WANDB_DIR") or out)
        directory.mkdir(parents=True, exist_ok=True)
        self.where = f"W&B project {project} ({mode})"
        try:
            self.run = wandb.init(project=project, entity=w.entity or os.environ.get("WANDB_ENTITY"),
                                  name=child or w.name or out.name, tags=list(w.tags) or None, mode=mode,
                                  dir=str(directory), id=run_id, resume="allow", group=group,
                                  job_type="trial" if child else None, reinit="create_new",
                                  settings=wandb.Settings(console="off", silent=True, x_disable_stats=True,
                                                          init_timeout=60))
        except Exception as err:
            raise ConfigError(f"tracking.report_to: wandb: the run could not start in {self.where} "
                              f"({type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}); "
                              f"log in (wandb login, or WANDB_API_KEY), or set tracking.wandb.mode: offline") from None
        self.identity = {"run_id": run_id, "project": project, "mode": mode, "dir": str(directory), "group": group}
        self.as_parent = self.identity
        if not known:
            write_identity(out, self.name, self.identity)
        self.floor = int(self.run.step or 0)  # a resumed run: W&B ignores steps at or below its last
        self.last = self.floor

    def scalars(self, values: dict[str, float], step: int, stamp: int) -> None:
        if step > self.last:
            self.run.log(dict(values), step=step)
            self.last = step
        elif step == self.last and step > self.floor:
            self.run.log(dict(values), step=step)
        else:  # an earlier step (a test metric of the best checkpoint): the run's summary holds it
            self.run.summary.update(dict(values))

    def text(self, tag: str, markdown: str, step: int) -> None:
        import wandb

        if step >= self.last and step > self.floor:
            self.run.log({tag: wandb.Html(f"<pre>{_escape(markdown)}</pre>")}, step=step)
            self.last = step

    def params(self, values: dict, tags: dict[str, str]) -> None:
        self.run.config.update({**values, **{f"sft.{k}" if not k.startswith("sft.") else k: v
                                              for k, v in tags.items()}}, allow_val_change=True)

    def artifact(self, path: Path) -> None:
        import wandb

        if not path.exists():
            return
        artifact = wandb.Artifact(f"{self.run.id}-{path.name.replace('.', '-')}", type="run-file")
        artifact.add_dir(str(path)) if path.is_dir() else artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def close(self) -> None:
        self.run.finish()


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
