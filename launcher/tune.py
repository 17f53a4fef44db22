"""`sft-launch CONFIG --tune`: a hyperparameter search on the validation metric with Ray Tune.

Every trial is a complete sft run (its own DeepSpeed worker group, checkpoints, TensorBoard and
worker restarts; with scaling.min_nodes < nodes an elastic one, resized as a plain run's group is) in
`<output_dir>/trials/<trial id>/`, driven the way Ray Train V2 documents for
Tune: a Tune function per trial that runs the TorchTrainer and passes each validation to Tune, so
ASHA can stop a trial between evaluations. No trial touches the test split: when the search ends,
the controller tests the best trial's final sharded checkpoint once, exports it, and writes
tune_results.csv, best_config.yaml and TensorBoard HParams. Never imports deepspeed.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import yaml

from launcher.console import say
from launcher.controller import LaunchOptions
from launcher.records import Outcome, TrialRecord
from launcher.search_space import check_space, checked_values, distribution, trial_config
from launcher.tracking import Parent, open_tracker, run_params
from launcher.tune_results import (EXPERIMENT, TRIALS, collect, pick_best, top_lines, trial_dir, trial_line,
                                   trial_status, values_text, write_hparams, write_results)
from trainer import checkpoints
from trainer.early_stopping import selection
from trainer.config import ConfigError, RunConfig, TuneConfig
from trainer.config_load import resolve_paths, to_dict

STOP = ".stop-request"  # in a trial's folder: its workers checkpoint after the current step and stop
ASHA_STOP = "asha"  # what the scheduler writes there


class TrialStopped(RuntimeError):
    """A trial checkpointed and stopped because the search was asked to stop: it resumes with
    --tune --resume (Tune restarts errored trials then; a completed one it would keep)."""


@dataclass(frozen=True)
class TrialSetup:
    """What every trial function gets besides its searched values."""
    base: RunConfig  # the run config, with absolute paths
    out: str
    opts: LaunchOptions
    data_dir: Optional[str]  # prepared by the driver; a trial that searches data.*/model.* keys prepares its own
    stop_file: str
    parent: Parent  # the search's run in the trackers, each trial's run filed under it


# ---------------------------------------------------------------- one trial (in a Tune actor)


def run_trial(values: dict, setup: TrialSetup) -> None:
    """The Tune function of one trial: a plain run of the trial's config (the same parts a plain run
    assembles: controller.open_run, training_args, run_group), without the test split. Each validation
    goes to Tune (`tune.report`), where ASHA may end the trial."""
    import ray.tune

    from launcher import controller, ray_job

    trial_id = ray.tune.get_context().get_trial_id()
    out = trial_dir(Path(setup.out), trial_id)
    cfg = trial_config(setup.base, values, str(out))
    previous = TrialRecord.read(out)
    if previous is not None and previous.status == "failed":  # a restored search keeps a failed trial failed
        raise RuntimeError(previous.error or "failed in an earlier launch")
    out.mkdir(parents=True, exist_ok=True)
    record = replace(previous, status="running") if previous else TrialRecord(trial_id, values)
    if Path(setup.stop_file).exists():
        replace(record, status="stopped").write(out)
        raise TrialStopped("the search was asked to stop before this trial started")
    stop = out / STOP
    stop.unlink(missing_ok=True)  # a request of an earlier launch
    found = checkpoints.find_checkpoints(out / "checkpoints")
    resume_from = found[-1][1] if found else None
    data_dir = setup.data_dir
    if any(k.split(".")[0] in ("data", "model") for k in values):
        data_dir = _prepare(cfg, setup.opts.cache_dir, setup.base)
    paths, ctl = controller.open_run(cfg, out, resume_from, setup.parent, trial_id)  # a child of the search's run
    ctl.tracker.params(run_params(cfg), {"sft.trial": trial_id, "sft.searched": values_text(values)})
    started, spent = time.time(), record.wall_s
    metric = setup.base.tune.metric

    def on_report(item) -> None:
        nonlocal record
        latest = ctl.history[-1] if ctl.history else None
        ctl.receive(item)
        record = replace(record, steps=ctl.last_step, wall_s=round(spent + time.time() - started, 1))
        if ctl.history and ctl.history[-1] is not latest:  # an evaluation came (or came again, replayed)
            evaluation = ctl.history[-1]
            if metric not in evaluation.metrics:
                raise ConfigError(f"tune.metric: {metric!r} is not a validation metric of model.task "
                                  f"{cfg.model.task!r}; its validation reports {', '.join(sorted(evaluation.metrics))}")
            record = record.with_evaluation(evaluation)
            record.write(out)
            ray.tune.report({**evaluation.as_json(), "trial_step": evaluation.step})

    def pass_on_stop() -> None:
        """The search's stop request (a signal to the launcher) reaches this trial's workers (polled by
        ray_job.fit as its abort_reason; a trial itself never abandons its workers)."""
        if Path(setup.stop_file).exists() and not stop.exists():
            stop.write_text("stop requested\n")

    args = controller.training_args(paths, setup.opts, data_dir, stop, test=False)
    try:
        controller.run_group(cfg, ray_job.train_worker, args, paths.checkpoints, paths.attempt, ctl,
                             abort_reason=pass_on_stop, on_report=on_report)
    except BaseException as err:
        if not isinstance(err, KeyboardInterrupt):
            bad = isinstance(err, ConfigError)
            replace(record, status="failed", error=str(err) if bad else f"{type(err).__name__}: {err}",
                    bad_input=bad).write(out)
        raise
    finally:
        ctl.close()
    final = checkpoints.find_checkpoints(paths.checkpoints)
    by_asha = ctl.stopped and stop.exists() and stop.read_text().startswith(ASHA_STOP)
    record = replace(record, status="stopped early" if by_asha else "stopped" if ctl.stopped else "completed",
                     steps=ctl.last_step, final_checkpoint=str(final[-1][1]) if final else None,
                     wall_s=round(spent + time.time() - started, 1))
    record.write(out)
    if ctl.stopped and not by_asha:
        raise TrialStopped(f"checkpointed at step {ctl.last_step} and stopped on request")


def _prepare(cfg: RunConfig, cache_dir: str, base: RunConfig) -> str:
    """A trial whose data or model keys differ from the base config's prepares its own data, or finds it
    prepared by another trial with the same values: in the search's cache (the base config's)."""
    from launcher.plan import make_plan, with_prepared_data
    from trainer import data_cache

    plan = with_prepared_data(make_plan(cfg, cache_dir), cfg, data_cache.cache_root(base), lambda text: None)
    return plan.data_dir


# ---------------------------------------------------------------- the search (on the driver)


def param_space(tune: TuneConfig) -> dict:
    from ray import tune as rt

    make = {"uniform": lambda a: rt.uniform(*a), "loguniform": lambda a: rt.loguniform(*a),
            "randint": lambda a: rt.randint(*a), "choice": rt.choice, "grid": rt.grid_search}
    return {key: make[kind](args) for key, (kind, args) in
            ((key, distribution(key, spec)) for key, spec in tune.space.items())}


HEAD_NODE = "node:__internal_head__"  # the resource Ray gives its head node alone (Ray Train's state actor asks it too)


def trial_resources() -> dict:
    """What a trial's function asks Ray for. Its workers hold the CPUs (through each trial's ScalingConfig),
    but Tune places nothing that asks for nothing: one byte of Ray's memory resource. And a sliver of the
    head node: the trial's Ray Train controller and message queue are attached to the node its function
    runs on, so on another node the loss of that node would end the trial, where an elastic trial's
    group should be resized (a plain run's are on the driver's node; losing the head is fatal anyway)."""
    return {"CPU": 0, "memory": 1, HEAD_NODE: 0.001}


def concurrency(cfg: RunConfig, cluster: dict, gpus_per_worker: float) -> int:
    """How many trials the cluster holds at once: each needs world_size workers' CPUs (and GPUs)."""
    s = cfg.scaling
    fits = [cluster.get("CPU", 0) // (s.world_size * s.cpus_per_worker)]
    if gpus_per_worker > 0:
        fits.append(cluster.get("GPU", 0) // (s.world_size * gpus_per_worker))
    return max(1, int(min(fits)))


def _scheduler(tune: TuneConfig, out: Path):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

    if tune.scheduler == "fifo":
        return FIFOScheduler()

    class CheckpointingASHA(ASHAScheduler):
        """ASHA's decisions, carried out by the trial: its workers checkpoint after the current step and
        stop, and the trial ends on its own. (Tune would kill the trial's actor instead, and Ray Train
        2.60 frees a killed controller's worker placement group only through the dashboard's state API:
        the CPUs would stay taken and the next trial would wait for ever.)"""

        def on_trial_result(self, tune_controller, trial, result):
            decision = super().on_trial_result(tune_controller, trial, result)
            if decision != TrialScheduler.STOP:
                return decision
            stop = trial_dir(out, trial.trial_id) / STOP
            if not stop.exists():
                stop.write_text(f"{ASHA_STOP}: below the top 1/{tune.reduction_factor} at evaluation "
                                f"{result.get('training_iteration')}\n")
            return TrialScheduler.CONTINUE

    # Time is counted in evaluations (Tune's training_iteration: one report per validation). ASHA
    # also ends a trial that reaches max_t, so it lies beyond any schedule.
    return CheckpointingASHA(time_attr="training_iteration", grace_period=tune.grace_period,
                             reduction_factor=tune.reduction_factor, max_t=2 ** 20)


def _search_alg(tune: TuneConfig):
    if tune.search_alg == "random":
        return None  # Tune's default: random and grid sampling of the space
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch()


def check_search(cfg: RunConfig, resume: bool, out: Path) -> None:
    """Bad input that the config alone cannot show."""
    import importlib.util

    if cfg.tune is None:
        raise ConfigError("--tune needs a tune: section in the config (tune.space: the keys to search; see "
                          "the README, 'Search hyperparameters')")
    if not cfg.tune.space:
        raise ConfigError("tune.space is empty: give at least one key to search, e.g. "
                          "optim.lr: {loguniform: [1.0e-5, 1.0e-3]}")
    check_space(cfg)
    if cfg.tune.search_alg == "optuna" and importlib.util.find_spec("optuna") is None:
        raise ConfigError("tune.search_alg: optuna needs the optuna package (pip install optuna); "
                          "or use tune.search_alg: random")
    if "mlflow" in cfg.tracking.report_to and cfg.scaling.nodes > 1:
        from launcher.tracking_mlflow import embedded, tracking_uri

        if embedded(tracking_uri(cfg, out)):
            raise ConfigError("tracking.report_to: mlflow with the embedded SQLite store, and a search over "
                              f"{cfg.scaling.nodes} nodes: its trials would write one SQLite file from several "
                              "hosts. Start a tracking server (mlflow server) and set tracking.mlflow.tracking_uri "
                              "(or MLFLOW_TRACKING_URI) to it")
    experiment = out / EXPERIMENT
    if resume and not experiment.is_dir():
        raise ConfigError(f"--tune --resume: no search to continue in {out} (expected {experiment}); "
                          f"start it without --resume")
    if not resume and (experiment.exists() or (out / TRIALS).exists() or (out / "run_summary.json").exists()):
        raise ConfigError(f"output_dir {out} already holds a search or a run; pass --resume to continue it, or "
                          f"choose another directory with --output")


def search(cfg: RunConfig, opts: LaunchOptions, resume: bool = False) -> Outcome:
    """Preflight, the trials, the test of the best trial, the results."""
    from launcher import controller, run_lock

    started_at = time.time()
    cfg = absolute_paths(cfg)
    out = Path(cfg.output_dir)
    check_search(cfg, resume, out)
    out.mkdir(parents=True, exist_ok=True)
    # One launch per output directory; a refused write ends the search in one paragraph.
    with run_lock.held(out, say), controller.storage_faults(out):
        stopper = controller.Stopper(out / ".stop-request", cfg.train.stop_grace_s)
        tracker = open_tracker(cfg, out, search=True)  # the search's own run; each trial's is filed under it
        say(tracker.describe())
        try:
            with stopper.installed():
                return _search(cfg, opts, resume, out, stopper, tracker, started_at)
        finally:
            tracker.close()


def _search(cfg: RunConfig, opts: LaunchOptions, resume: bool, out: Path, stopper, tracker, started_at: float) -> Outcome:
    """The search inside its lock, stop handling and tracker (search)."""
    from launcher import controller, ray_job

    _check_trial_plans(cfg, opts.cache_dir)
    plan = controller.preflight(cfg, controller.Paths(out, None, None), opts)
    tracker.params(run_params(cfg), {"sft.search": f"val {cfg.tune.metric} ({cfg.tune.mode})"})
    describe_search(cfg.tune, resume)
    if stopper.requested:
        return Outcome("stopped")
    ray_job.start_ray(opts.address, opts.verbose)
    try:
        setup = TrialSetup(cfg, str(out), opts, plan.data_dir, str(stopper.stop_file), tracker.as_parent())
        run_search(cfg, setup, resume, stopper)
        records = collect(out)
        tracker.artifact(write_results(out, cfg.tune, records))
        write_hparams(out, cfg.tune, records)
        bad = [r for r in records if r.bad_input]
        if bad:
            raise ConfigError(bad[0].error)
        for line in top_lines(cfg.tune, records):
            say(line)
        if stopper.requested or any(r.status == "stopped" for r in records):
            say(f"search stopped: {sum(r.status == 'stopped' for r in records)} trial(s) to continue; "
                f"continue with: sft-launch <config> --tune --output {out} --resume")
            return Outcome("stopped")
        best = pick_best(cfg.tune, records)
        best_cfg = trial_config(cfg, best.values, str(out / "best_run"))
        (out / "best_config.yaml").write_text(
            f"# The best trial of the search in {out} ({best.trial}), as a plain run config:\n"
            f"#   sft-launch {out / 'best_config.yaml'}\n" + yaml.safe_dump(to_dict(best_cfg), sort_keys=False))
        say(f"best trial {best.trial}: {values_text(best.values)}; val {cfg.tune.metric} "
            f"{best.last(cfg.tune.metric):.4g} (its final evaluation); testing its final checkpoint")
        ctl = evaluate_best(cfg, best, out, opts, plan.data_dir, stopper, tracker)
    finally:
        ray_job.stop_ray()
    # The summary of the best trial's run, as a plain run writes it, plus the search.
    paths = controller.Paths(out, None, None, checkpoint_dir=trial_dir(out, best.trial) / "checkpoints")
    search_summary = {"best_trial": best.trial, "best_values": best.values, "metric": cfg.tune.metric,
                      "mode": cfg.tune.mode, "chosen_by": "final validation value",
                      "trials": {r.trial: r.status for r in records},
                      "results": str(out / "tune_results.csv"), "best_config": str(out / "best_config.yaml")}
    trained = trial_config(cfg, best.values, str(trial_dir(out, best.trial)))
    return controller.summarise(trained, paths, ctl, plan, Path(best.final_checkpoint), time.time() - started_at,
                                extra={"tune": search_summary})


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """Trials run in other processes (and, on a cluster, other hosts): every path absolute (relative
    ones that exist from here, as a plain run reads them; the output and cache folders always)."""
    cfg = resolve_paths(cfg, Path.cwd())
    cache = cfg.data.cache_dir
    return replace(cfg, data=replace(cfg.data, cache_dir=str(Path(cache).resolve()) if cache else None),
                   output_dir=str(Path(cfg.output_dir).resolve()))


def _check_trial_plans(cfg: RunConfig, cache_dir: str) -> None:
    """Values of finetune.* / model.* keys are checked against the model too (a layer count it lacks,
    say), as a plain run's preflight would, before any trial starts."""
    from launcher.plan import make_plan

    for key, spec in cfg.tune.space.items():
        if key.split(".")[0] not in ("finetune", "model"):
            continue
        for value in checked_values(*distribution(key, spec)):
            try:
                make_plan(trial_config(cfg, {key: value}), cache_dir)
            except ConfigError as err:
                raise ConfigError(f"tune.space.{key}: the search could give it {value!r}, which the model "
                                  f"refuses: {err}") from None


def describe_search(tune: TuneConfig, resume: bool) -> None:
    space = "; ".join(f"{k} {next(iter(v))} {list(next(iter(v.values())))}" for k, v in tune.space.items())
    how = (f"ASHA (grace {tune.grace_period} evaluation(s), reduction factor {tune.reduction_factor})"
           if tune.scheduler == "asha" else "FIFO (every trial runs its whole schedule)")
    say(f"{'continuing the' if resume else 'tune:'} search of val {tune.metric} ({tune.mode}) over {space}; "
        f"{tune.num_samples} sample(s), {tune.search_alg} search, {how}")


def run_search(cfg: RunConfig, setup: TrialSetup, resume: bool, stopper) -> None:
    """Run (or continue) the Tune experiment in `<output_dir>/tune`; returns when every trial ended."""
    import ray
    import ray.tune

    from launcher import ray_job

    tune = cfg.tune
    s = cfg.scaling
    if not setup.opts.verbose:
        # Tune's own tables and per-trial notices: the launcher prints a line per trial instead.
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
        logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    gpus = ray_job.gpus_per_worker(cfg)
    ray_job.check_resources(cfg, gpus)  # one trial at least must fit: say so now, not in a trial
    limit = tune.max_concurrent_trials or concurrency(cfg, ray.cluster_resources(), gpus)
    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, setup=setup), trial_resources())
    experiment = Path(setup.out) / EXPERIMENT
    callbacks = [_trial_lines(Path(setup.out), tune)]
    if resume:
        tuner = ray.tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, resume_errored=True)
        say(f"continuing the search in {experiment}: finished trials are kept, stopped ones resume from "
            f"their checkpoints")
    else:
        tuner = ray.tune.Tuner(
            trainable, param_space=param_space(tune),
            tune_config=ray.tune.TuneConfig(metric=tune.metric, mode=tune.mode, num_samples=tune.num_samples,
                                            max_concurrent_trials=limit, scheduler=_scheduler(tune, Path(setup.out)),
                                            search_alg=_search_alg(tune), reuse_actors=False),
            run_config=ray.tune.RunConfig(name=EXPERIMENT, storage_path=setup.out, verbose=2 if setup.opts.verbose else 0,
                                           callbacks=callbacks))
    say(f"trials: up to {limit} at a time, each {s.world_size} worker(s); each in {Path(setup.out) / TRIALS}/<trial>")

    def tick() -> bool:
        time.sleep(0.5)
        reason = stopper.abort_reason()
        if reason:
            raise ray_job.Aborted(reason)
        return False

    error = ray_job.in_background("ray-tune-fit", tuner.fit, tick)
    if error is not None:
        raise ray_job.LaunchError(f"the search failed: {ray_job.describe_error(error)}") from error


def _trial_lines(out: Path, tune: TuneConfig):
    """A Tune callback on the driver: one console line per trial that ended."""
    from ray.tune import Callback

    class TrialLines(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            say(trial_line(trial_status(out, trial.trial_id, errored=False), tune))

        def on_trial_error(self, iteration, trials, trial, **info):
            say(trial_line(trial_status(out, trial.trial_id, errored=True), tune))

    return TrialLines()


def evaluate_best(cfg: RunConfig, best: TrialRecord, out: Path, opts: LaunchOptions, data_dir: Optional[str],
                  stopper, tracker):
    """The test split, once: before fine-tuning and from the best trial's final sharded checkpoint (or its
    best, with test.checkpoint: best), in a worker group of its own (run_group, as every launch's);
    rank 0 exports it to <output_dir>/final_model. Returns the test group's controller (it writes the
    search's own run)."""
    from launcher import controller, ray_job

    best_cfg = trial_config(cfg, best.values, str(out))
    if any(k.split(".")[0] in ("data", "model") for k in best.values):
        data_dir = _prepare(best_cfg, opts.cache_dir, cfg)
    ctl = controller.Controller(best_cfg, out, tracker=tracker)  # the search's own run
    # The checkpoint a plain run would test (test.checkpoint: final, or the best by validation), found
    # the way its workers find it; the trial has ended, so every checkpoint it reported is complete.
    tested = str(checkpoints.to_test(trial_dir(out, best.trial) / "checkpoints", None, best_cfg.test.checkpoint,
                                     *selection(best_cfg), Path(best.final_checkpoint)))
    controller.run_group(best_cfg, ray_job.test_worker, controller.test_args(out, opts, data_dir, tested),
                         out / "test_evaluation", "test", ctl, stopper.abort_reason,
                         finished=lambda: ctl.test is not None)
    if ctl.test is None:
        raise ray_job.LaunchError("the test worker group ended without a test result")
    return ctl
