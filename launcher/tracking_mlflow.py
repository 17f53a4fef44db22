"""MLflow behind the tracking seam (tracking.report_to: [mlflow]; pip install 'sft[mlflow]').

Where: `tracking.mlflow.tracking_uri`, else MLFLOW_TRACKING_URI, else the embedded default, a SQLite
store in the output directory (`sqlite:///<output_dir>/mlflow.db`, artifacts in
`<output_dir>/mlflow-artifacts/`: `mlflow ui --backend-store-uri sqlite:///<output_dir>/mlflow.db`).
The experiment: `tracking.mlflow.experiment`, else MLFLOW_EXPERIMENT_NAME, else "sft".

One run per output directory: its id is kept in <output_dir>/tracking.json, so `--resume`, a worker
group's restart and a Slurm requeue go on in the same run. Parameters cannot change in MLflow: a
resume that changes a config value keeps the first value as the parameter and says the new one in a
tag `sft.changed.<key>`. A search's trials are nested runs (tag mlflow.parentRunId) of the search's
run, in the search's store. Only the launcher's driver side imports this module (never deepspeed).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from launcher.tracking import Parent, read_identity, redact, write_identity
from trainer.config import ConfigError, RunConfig

DEFAULT_EXPERIMENT = "sft"
# A tracking server that is slow or gone must cost seconds, not MLflow's default minutes of retries
# (120 s timeout, 7 retries with backoff): the calls run on their own thread and are retried there.
# Its "View run at" lines would break the console's one-voice rule: the startup line says where.
CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
              "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


def default_uri(out: Path) -> str:
    return f"sqlite:///{Path(out).resolve() / 'mlflow.db'}"


def tracking_uri(cfg: RunConfig, out: Path) -> str:
    return cfg.tracking.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri(out)


def embedded(uri: str) -> bool:
    return uri.startswith("sqlite:")


def _param_value(value) -> str:
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    text = value if isinstance(value, str) else ("" if value is None else str(value))
    return text if len(text) <= MAX_PARAM_VAL_LENGTH else text[:MAX_PARAM_VAL_LENGTH - 3] + "..."


class MlflowBackend:
    """The client calls of one MLflow run (called on the Background thread, except __init__)."""

    name = "mlflow"

    def __init__(self, cfg: RunConfig, out: Path, parent: Optional[Parent] = None, child: Optional[str] = None,
                 search: bool = False):
        for key, value in CLIENT_ENV.items():
            os.environ.setdefault(key, value)
        from mlflow.tracking import MlflowClient

        m = cfg.tracking.mlflow
        nested = parent.mlflow if parent is not None and parent.mlflow else None
        self.uri = nested["tracking_uri"] if nested else tracking_uri(cfg, out)
        self.where = f"MLflow at {redact(self.uri)}"
        self.client = MlflowClient(self.uri)
        try:
            if nested:
                experiment_id = nested["experiment_id"]
            else:
                name = m.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
                found = self.client.get_experiment_by_name(name)
                experiment_id = found.experiment_id if found else self.client.create_experiment(
                    name, artifact_location=(Path(out).resolve() / "mlflow-artifacts").as_uri()
                    if embedded(self.uri) else None)
            known = read_identity(out).get(self.name, {})
            if known.get("run_id") and known.get("tracking_uri") == redact(self.uri):
                self.run_id = known["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                tags = {**{k: str(v) for k, v in m.tags.items()}, "sft.output_dir": str(Path(out).resolve())}
                if nested:
                    tags["mlflow.parentRunId"] = nested["run_id"]
                run = self.client.create_run(experiment_id, tags=tags,
                                             run_name=child or m.run_name or Path(out).resolve().name)
                self.run_id = run.info.run_id
                write_identity(out, self.name, {"tracking_uri": redact(self.uri), "run_id": self.run_id,
                                                "experiment_id": experiment_id})
            self.experiment_id = experiment_id
            self.floor = self._last_step()
        except ConfigError:
            raise
        except Exception as err:
            raise ConfigError(f"tracking.report_to: mlflow: the tracking store {redact(self.uri)} cannot be used "
                              f"({type(err).__name__}: {redact(str(err).strip().splitlines()[0][:200]) if str(err).strip() else ''}); "
                              f"start the tracking server or set tracking.mlflow.tracking_uri (or MLFLOW_TRACKING_URI) "
                              f"to one that answers") from None

    def _last_step(self) -> int:
        """The last training step the run has (a resumed run's points at or below it are not sent again)."""
        history = self.client.get_metric_history(self.run_id, "train/loss")
        return max((m.step for m in history), default=0)

    @property
    def identity(self) -> dict:
        """The run, as the summary and tracking.json name it (no credentials)."""
        return {"tracking_uri": redact(self.uri), "experiment_id": self.experiment_id, "run_id": self.run_id}

    @property
    def as_parent(self) -> dict:
        """What a trial needs to file its run under this one (the URI as given: the trial connects with it)."""
        return {**self.identity, "tracking_uri": self.uri}

    def scalars(self, values: dict[str, float], step: int, stamp: int) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(k, float(v), stamp, step) for k, v in values.items()
                   if step > self.floor or not k.startswith(("train/", "val/"))]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000], synchronous=True)

    def text(self, tag: str, markdown: str, step: int) -> None:
        if step > self.floor:
            self.client.log_text(self.run_id, markdown, f"{tag}/step_{step:07d}.md")

    def params(self, values: dict, tags: dict[str, str]) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH

        logged = self.client.get_run(self.run_id).data.params
        new, changed = [], []
        for key, value in values.items():
            key, text = key[:MAX_ENTITY_KEY_LENGTH], _param_value(value)
            if key not in logged:
                new.append(Param(key, text))
            elif logged[key] != text:  # a resume with another value: MLflow keeps parameters as first logged
                changed.append(RunTag(f"sft.changed.{key}"[:MAX_ENTITY_KEY_LENGTH], f"{logged[key]} -> {text}"[:5000]))
        run_tags = [RunTag(k, str(v)) for k, v in tags.items()] + changed
        for i in range(0, max(len(new), len(run_tags)), 100):
            self.client.log_batch(self.run_id, params=new[i:i + 100], tags=run_tags[i:i + 100], synchronous=True)

    def artifact(self, path: Path) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), path.name)
        elif path.exists():
            self.client.log_artifact(self.run_id, str(path))

    def close(self, finished: bool = True) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if finished else "KILLED")
