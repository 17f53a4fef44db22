"""The controller: runs a job from preflight to the final summary, on the driver.

It receives validation metrics while training runs (one printed line per evaluation), tracks the
best, prunes checkpoints (last keep_last + best) and writes every metric of the run to its tracker
(launcher/tracking.py); the same workers then run the test evaluation on the final sharded checkpoint
(trainer/loop.py fine_tune) and export the model, and it writes test_metrics.json and run_summary.json.

Every launch assembles the same parts from here: `open_run` (the output layout, a new attempt, the
run's tracker, the controller), `training_args` / `test_args` (what the workers are asked) and
`run_group` (one worker group from start to end). A plain run uses them once; a search (launcher/tune.py)
once per trial and once for the best trial's test. Never imports deepspeed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import signal
import sys
import time

import yaml
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from launcher.console import say
from launcher.records import Evaluation, Outcome, one_per_step
from launcher.resizes import GroupLog, read_history, write_history
from launcher.tracking import Parent, Tracker, open_tracker, public_config, run_params
from trainer import checkpoints, early_stopping
from trainer.config import ConfigError, RunConfig
from trainer.jobs import WorkerArgs
from trainer.messages import (BadInput, GroupStarted, GroupStarting, LogLine, Received, StepMetrics, StorageFailure,
                              TestResult, TrainReport, WorkerFailure)
from trainer.storage import StorageError, writing


def resolve_resume(out: Path, resume: Optional[str]) -> Optional[Path]:
    """--resume with no path: the latest complete checkpoint of the run in `out`."""
    if resume is None:
        return None
    if resume:
        path = Path(resume)
        if not checkpoints.is_complete(path):
            raise ConfigError(f"--resume {resume}: not a complete checkpoint folder "
                              f"(expected {checkpoints.STATE_FILE}, the '{checkpoints.TAG}' shards and every "
                              f"rank's RNG file)")
        return path.resolve()
    found = checkpoints.find_checkpoints(out / "checkpoints")
    if not found:
        raise ConfigError(f"--resume: no complete checkpoint under {out / 'checkpoints'}; "
                          f"start the run without --resume")
    return found[-1][1].resolve()


def _summary_of_a_run(out: Path) -> bool:
    """A run_summary.json of something to keep: not that of a launch stopped before its first checkpoint
    (it left nothing to resume, so starting again is the only way on)."""
    try:
        summary = json.loads((out / "run_summary.json").read_text())
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return True
    return not (summary.get("status") == "stopped" and not summary.get("final_checkpoint"))


def guard_output(out: Path, resuming: bool) -> None:
    """A new run never overwrites what an earlier run left in its output directory."""
    if not resuming and (checkpoints.find_checkpoints(out / "checkpoints") or _summary_of_a_run(out)):
        raise ConfigError(f"output_dir {out} already holds a run; pass --resume to continue it, or choose "
                          f"another directory with --output")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"output_dir {out}: not writable ({err.strerror})") from None


def check_resume(path: Path, cfg: RunConfig, plan, out: Path) -> None:
    """Refuse, before any worker starts, a checkpoint that cannot continue this config. A run that
    stopped early and was interrupted before its test results were written goes on to its test."""
    state = checkpoints.read_state(path)
    if state.stopped_early and (out / "test_metrics.json").exists():
        raise ConfigError(f"--resume {path}: the run stopped early at step {state.step} (train.early_stopping: "
                          f"validation had not improved for the patience's evaluations), so there is nothing left to "
                          f"train; its test results are in the output directory. To train further, start a new run "
                          f"(another --output) from its weights, or raise train.early_stopping.patience in a new run")
    if state.model != checkpoints.model_identity(cfg.model):
        raise ConfigError(f"--resume {path}: the checkpoint is of model {state.model!r}, but the config trains "
                          f"{checkpoints.model_identity(cfg.model)!r}")
    if state.zero_stage != cfg.deepspeed.zero_stage:
        raise ConfigError(f"--resume {path}: the checkpoint was written with deepspeed.zero_stage "
                          f"{state.zero_stage}, the config asks for {cfg.deepspeed.zero_stage}; keep the stage")
    if state.trainable and state.trainable != plan.trainable_digest:
        raise ConfigError(f"--resume {path}: the finetune rules select other trainable parameters than the run "
                          f"that wrote the checkpoint; keep finetune.* as it was")
    bad = checkpoints.corrupted_files(path)
    if bad:
        earlier = [p for step, p in checkpoints.find_checkpoints(out / "checkpoints")
                   if step < state.step and not checkpoints.corrupted_files(p)]
        hint = (f"resume from the previous complete checkpoint with --resume {earlier[-1]}" if earlier
                else "no earlier complete checkpoint is left in the output directory: start the run again")
        raise ConfigError(f"--resume {path}: corrupted checkpoint file(s): {', '.join(str(b) for b in bad[:3])}; "
                          f"{hint}")


def check_disk(out: Path, needed: int) -> None:
    free = shutil.disk_usage(out).free
    if free < needed:
        raise ConfigError(f"output_dir {out}: {free / 2**30:.2f} GiB free, but one checkpoint needs about "
                          f"{needed / 2**30:.2f} GiB; free space or choose another --output")


@dataclass
class Controller:
    """What the driver learns while worker groups run: one typed message at a time."""
    cfg: RunConfig
    out: Path
    protected: set = field(default_factory=set)
    history: list[Evaluation] = field(default_factory=list)
    best: Optional[Evaluation] = None  # by early_stopping.selection's metric (for the console and the summary)
    ranks: dict = field(default_factory=dict)
    restarts: int = 0
    bad_input: Optional[str] = None
    test: Optional[TestResult] = None
    last_failure: Optional[WorkerFailure] = None
    trained: bool = False  # the last step of the schedule was reported: the test evaluation runs
    stopped: bool = False  # the workers reported their last step before a requested stop
    stopped_early_at: Optional[int] = None  # the step where train.early_stopping ended the training
    last_step: int = 0  # the last step the workers reported
    failed_at: Optional[int] = None  # last_step when the last failure came
    held: list = field(default_factory=list)  # LogLines waiting for the last training report
    tracker: Optional[Tracker] = None  # the run's one writer of metrics (launcher/tracking.py)
    tracked_step: int = 0  # the last step whose metrics went to the tracker
    groups: GroupLog = field(default_factory=GroupLog)  # the worker groups' sizes and resizes (elastic runs)
    unsettled: Optional[str] = None  # an elastic run's last failure, until the next group shows what it cost

    @property
    def failure_log(self) -> Path:
        return self.out / "logs" / "worker_failures.log"

    def start_from(self, step: int) -> None:
        """The launch goes on from a checkpoint of `step`: what an earlier launch tracked past it goes."""
        self.tracked_step = step
        if self.tracker is not None and step:
            self.tracker.rewind(step)

    def track(self, metrics: StepMetrics) -> None:
        if self.tracker is None:
            return
        if metrics.step <= self.tracked_step:  # a restarted group replays the steps after its checkpoint
            self.tracker.rewind(metrics.step - 1)
        self.tracked_step = metrics.step
        world = self.groups.world_size or self.cfg.scaling.world_size  # the group that took the step
        self.tracker.scalars({**metrics.scalars, "train/world_size": float(world)}, metrics.step)
        for tag, markdown in metrics.texts.items():
            self.tracker.text(tag, markdown, metrics.step)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()

    def receive(self, item) -> None:
        if isinstance(item, StepMetrics):
            resize = self.groups.stepped(item.step, time.monotonic())
            if resize is not None:
                say(f"training again at step {item.step} on {resize.to_world_size} worker(s), {resize.lost_s:g} s "
                    f"after the group stopped")
            self.track(item)
        elif isinstance(item, GroupStarting):
            self.groups.halted(time.monotonic())
        elif isinstance(item, GroupStarted):
            self.on_group_started(item)
        elif isinstance(item, LogLine):
            if item.after_training and not self.trained:
                self.held.append(item.text)
            else:
                say(item.text)
        elif isinstance(item, WorkerFailure):
            self.on_failure(item)
        elif isinstance(item, StorageFailure):
            raise StorageError(item.what, item.path, item.error)
        elif isinstance(item, BadInput):  # one rank's, sent at once (ray_job.RayReporter.refuse)
            raise ConfigError(item.message)
        elif isinstance(item.first, BadInput):
            self.bad_input = item.first.message
        elif isinstance(item.first, TestResult):
            self.test = item.first
            if not self.ranks:  # a search's test group: where its ranks ran
                self.ranks = dict(enumerate(item.where))
        else:
            self.on_train_report(item)

    def on_train_report(self, item: Received) -> None:
        for rank, where in enumerate(item.where):
            self.ranks[rank] = where
        report: TrainReport = item.first
        self.last_step = report.step
        self.trained = self.trained or report.final
        self.stopped = self.stopped or report.stopped
        if report.validation:
            evaluation = Evaluation(report.step, dict(report.validation))
            # After a restart the steps past the checkpoint run again: keep one entry per step.
            self.history = one_per_step(self.history, evaluation)
            if self.tracker is not None:
                self.tracker.scalars({f"val/{k}": v for k, v in report.validation.items()}, report.step)
            metric, mode = early_stopping.selection(self.cfg)
            score = evaluation.score(metric, mode)
            if score is not None and (self.best is None or score < self.best.score(metric, mode)):
                self.best = evaluation
            shown = "  ".join(f"{k} {v:.4g}" for k, v in evaluation.metrics.items() if k != "loss")
            best = f"  (best {metric} {self.best.value(metric):.4f} at step {self.best.step})" if self.best else ""
            say(f"eval  step {evaluation.step}: val loss {evaluation.value('loss'):.4f}  {shown}{best}")
        if report.stopped_early:
            self.stopped_early_at = report.step
            e = self.cfg.train.early_stopping
            best = f" (best {self.best.value(e.metric):.4g} at step {self.best.step})" if self.best else ""
            say(f"early stopping at step {report.step}: validation {e.metric} has not improved by more than "
                f"{e.min_delta:g} for {e.patience} evaluation(s){best}; checkpointed, the test evaluation comes next")
        if item.checkpoint:
            path = Path(item.checkpoint)
            with writing(f"the completion marker of checkpoint {path.name}", path):
                # The resizes so far go with it (before the marker): a launch that resumes it carries them.
                write_history(path, self.groups.resizes)
                checkpoints.mark_complete(path)  # every rank's part is persisted now
            if self.tracker is not None:
                self.tracker.commit(report.step)  # what was tracked up to it is final (tracking.Held)
            if self.best is not None and self.best.step == report.step:
                self.best = dataclasses.replace(self.best, checkpoint=str(path))
            self.prune(keep=path)
        if self.trained:
            for text in self.held:
                say(text)
            self.held.clear()

    def on_failure(self, failure: WorkerFailure) -> None:
        """A restart, or the end: when the same errors come back with no step reported in between, the
        failure is deterministic (bad data past preflight, a bug) and restarting again only repeats it.
        Process deaths differ each time (the pid is in the message) and keep their restarts."""
        repeated = self.last_failure is not None and self.failed_at == self.last_step \
            and set(self.last_failure.errors.values()) == set(failure.errors.values())
        self.failed_at = self.last_step
        if not self.cfg.scaling.is_elastic:  # elastic: counted once the next group shows what it cost
            self.restarts += 1
        latest = checkpoints.find_checkpoints(self.out / "checkpoints")
        resume_at = f"step {latest[-1][0]}" if latest else "the start"
        detail = "; ".join(f"rank {r}: {msg}" for r, msg in sorted(failure.errors.items()))
        try:  # the error path must not depend on the disk: a full one only loses the log
            self.failure_log.parent.mkdir(parents=True, exist_ok=True)
            with self.failure_log.open("a") as log:
                for rank, text in sorted(failure.details.items()):
                    log.write(f"=== failure {self.restarts}, rank {rank}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n{text}\n")
        except OSError as err:
            say(f"could not write {self.failure_log} ({err.strerror}); the traceback follows on the console")
            for rank, text in sorted(failure.details.items()):
                print(text.rstrip(), file=sys.stderr, flush=True)
        self.last_failure = failure
        if self.cfg.scaling.is_elastic and not repeated:
            # Ray restarts the group on the workers that remain placeable: fewer after a lost node (a
            # resize, not a restart: it does not use up train.max_failures), as many after a process
            # death (a restart). Which one, the next group's size tells (on_group_started).
            self.groups.halted(time.monotonic())
            self.unsettled = detail
            say(f"worker failure ({detail}); the worker group restarts from the latest checkpoint ({resume_at}) "
                f"on the workers that remain placeable")
            return
        if repeated:
            say(f"worker failure ({detail}) again, with no progress since the last restart: not restarting")
            when = f"after step {self.last_step}" if self.last_step else "before the first step"
            raise RepeatedFailure(f"the same error twice {when} ({detail})")
        if self.restarts > self.cfg.train.max_failures:
            say(f"worker failure ({detail}); train.max_failures = {self.cfg.train.max_failures} reached")
        else:
            say(f"worker failure ({detail}); restart {self.restarts}/{self.cfg.train.max_failures}: "
                f"the worker group continues from the latest checkpoint ({resume_at})")

    def on_group_started(self, started: GroupStarted) -> None:
        """An elastic run's group runs: say so when it is a resize; a failure that restarted it on as many
        workers counts against train.max_failures (Ray's own budget is unlimited for elastic runs)."""
        before = self.groups.world_size
        kind = self.groups.started(started.where, time.monotonic())
        if kind != "first":
            # What the failed group half wrote goes before the new one replays its steps. Ray's controller
            # sent every registered checkpoint's report before this message (one sender, in order), so
            # each of those is marked complete by now.
            for path in checkpoints.partial_after_latest(self.out / "checkpoints"):
                shutil.rmtree(path, ignore_errors=True)
        failure, self.unsettled = self.unsettled, None
        latest = checkpoints.find_checkpoints(self.out / "checkpoints")
        resume_at = f"step {latest[-1][0]}" if latest else "the start"
        if kind == "resize":
            node = self.groups.pending[2] if self.groups.pending else ""
            how = f"node {node} left" if started.world_size < before else f"node {node} joined"
            absorbed = f"; the failure ({failure}) does not count against train.max_failures" if failure else ""
            say(f"resize: the worker group goes from {before} to {started.world_size} worker(s) ({how}; "
                f"{len(set(self.groups.nodes))} node(s) now) and continues from the latest checkpoint ({resume_at}), "
                f"the global batch kept{absorbed}")
        elif kind == "same size" and failure is not None:
            self.restarts += 1
            if self.restarts > self.cfg.train.max_failures:
                say(f"train.max_failures = {self.cfg.train.max_failures} reached: not continuing")
                raise FailuresExhausted(f"{self.restarts} failures that a resize did not absorb (the last: "
                                        f"{failure}); train.max_failures = {self.cfg.train.max_failures}")
            say(f"restart {self.restarts}/{self.cfg.train.max_failures}: the worker group continues on "
                f"{started.world_size} worker(s) from the latest checkpoint ({resume_at})")

    def prune(self, keep: Path) -> None:
        found = checkpoints.find_checkpoints(self.out / "checkpoints")
        metric, mode = early_stopping.selection(self.cfg)
        scored = [(step, path, early_stopping.score(checkpoints.read_state(path).validation, metric, mode))
                  for step, path in found]
        kept = checkpoints.retained(scored, self.cfg.train.keep_last, self.protected | {keep})
        for _, path, _ in scored:
            if path not in kept:
                shutil.rmtree(path, ignore_errors=True)


class RepeatedFailure(Exception):
    """The same worker error again after a restart, at the same point."""


class FailuresExhausted(Exception):
    """An elastic run met more failures that no resize absorbed than train.max_failures allows."""


class Stopper:
    """SIGTERM, SIGUSR1 (what Slurm sends before preemption or the time limit) and Ctrl-C ask the
    workers to finish the current step, checkpoint and stop; a second Ctrl-C aborts at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, stop_file: Path, grace_s: float):
        self.stop_file, self.grace_s = stop_file, grace_s
        self.deadline: Optional[float] = None
        self.unwritable = False  # the stop request could not be written: the workers cannot see it

    def _handle(self, signum, frame) -> None:
        if self.deadline is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.deadline = time.monotonic() + self.grace_s
        try:
            # The workers look for the file, not its text: an empty file takes no data blocks and is
            # made on a full disk too.
            self.stop_file.touch()
            self.stop_file.write_text(f"{signal.Signals(signum).name}\n")
        except OSError:
            if not self.stop_file.exists():
                self.unwritable = True
        say(f"{signal.Signals(signum).name}: the workers checkpoint after the current step and stop "
            f"(grace {self.grace_s:g} s; Ctrl-C again aborts at once)")

    @property
    def requested(self) -> bool:
        return self.deadline is not None

    def abort_reason(self) -> Optional[str]:
        if self.unwritable:
            return f"the stop request could not be written to {self.stop_file}, so the workers cannot see it"
        if self.deadline is not None and time.monotonic() > self.deadline:
            return f"the workers did not stop within train.stop_grace_s = {self.grace_s:g} s"
        return None

    @contextlib.contextmanager
    def installed(self):
        self.stop_file.unlink(missing_ok=True)
        previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.stop_file.unlink(missing_ok=True)


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    with writing(path.name, path):
        try:
            tmp.write_text(json.dumps(data, indent=2, default=str))
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        tmp.replace(path)


def test_scalars(before: dict, after: dict) -> dict[str, float]:
    """test/<metric> (from the tested checkpoint) and test_before/<metric> beside it, for comparison."""
    return {f"{prefix}/{k}": v for prefix, metrics in (("test", after), ("test_before", before))
            for k, v in metrics.items() if isinstance(v, (int, float)) and k not in ("tokens", "examples")}


@dataclass(frozen=True)
class LaunchOptions:
    """What the command line sets for a whole launch besides the config, as one value."""
    cache_dir: str  # models (a GGUF de-quantized once) and other conversions, reused across runs
    address: Optional[str] = None  # a Ray cluster to join; None: RAY_ADDRESS, else a private local one
    verbose: bool = False  # the workers' own output (library notices, progress bars) on the console


@dataclass(frozen=True)
class Paths:
    """Where one run reads and writes: its output directory, this launch's attempt folder under its
    checkpoints, and the checkpoint it starts from."""
    out: Path
    attempt: Optional[str]  # None: a launch that trains nothing (a search's driver)
    resume_from: Optional[Path]
    checkpoint_dir: Optional[Path] = None  # default <out>/checkpoints (a search's summary: its best trial's)

    @property
    def checkpoints(self) -> Path:
        return self.checkpoint_dir or self.out / "checkpoints"

    @classmethod
    def next_attempt(cls, out: Path, resume_from: Optional[Path]) -> "Paths":
        """A launch's paths, in an attempt folder numbered one more than any so far: a reused name
        would make Ray restore that attempt's state."""
        numbers = [int(p.name.split("-", 1)[1]) for p in (out / "checkpoints").glob("attempt-*")
                   if p.name.split("-", 1)[1].isdigit()]
        return cls(out, f"attempt-{max(numbers, default=0) + 1}", resume_from)


def open_run(cfg: RunConfig, out: Path, resume_from: Optional[Path], parent: Optional[Parent] = None,
             child: Optional[str] = None) -> tuple[Paths, Controller]:
    """The output layout and the controller of one training run (a plain run, or a search trial, filed
    under the search's `parent` run as `child`): a new attempt folder, the run's trackers
    (tracking.report_to; TensorBoard under <out>/tensorboard), the resumed checkpoint protected from
    pruning, the trackers rewound to it, and the resizes of the launches that led to it carried on
    (run_summary.json `resizes`; launcher/resizes.py)."""
    paths = Paths.next_attempt(out, resume_from)
    earlier = read_history(resume_from) if resume_from else []
    ctl = Controller(cfg, out, protected={resume_from} if resume_from else set(), groups=GroupLog(resizes=earlier),
                     tracker=open_tracker(cfg, out, parent, child))
    if resume_from:
        ctl.start_from(checkpoints.read_state(resume_from).step)
    return paths, ctl


def training_args(paths: Paths, opts: LaunchOptions, data_dir: Optional[str], stop_file: Path,
                  test: bool) -> WorkerArgs:
    """What the workers of a training run are asked: train into this attempt's folder, then (`test`)
    evaluate the test split and export into the output directory (a search trial does not test)."""
    outputs = dict(export_dir=str(paths.out / "final_model"), predictions_path=str(paths.out / "test_predictions.jsonl"),
                   test_generations_path=str(paths.out / "test_generations.jsonl")) if test else {}
    return WorkerArgs(cache_dir=opts.cache_dir, data_dir=data_dir,
                      resume_from=str(paths.resume_from) if paths.resume_from else None, stop_file=str(stop_file),
                      verbose=opts.verbose, checkpoint_root=str(paths.checkpoints / paths.attempt),
                      generations_dir=str(paths.out / "generations"), test_after=test, **outputs)


def test_args(out: Path, opts: LaunchOptions, data_dir: Optional[str], checkpoint: str) -> WorkerArgs:
    """What the workers of a test-only group are asked (a search's best trial): evaluate `checkpoint`
    and export it into `out`."""
    return WorkerArgs(cache_dir=opts.cache_dir, data_dir=data_dir, final_checkpoint=checkpoint,
                      export_dir=str(out / "final_model"), predictions_path=str(out / "test_predictions.jsonl"),
                      test_generations_path=str(out / "test_generations.jsonl"), verbose=opts.verbose)


def run_group(cfg: RunConfig, worker, args: WorkerArgs, storage: Path, name: str, ctl: Controller,
              abort_reason=lambda: None, finished=lambda: False, on_report=None) -> None:
    """One worker group, from its start to its end, its messages handed to `on_report` (default: the
    controller's receive). Every launch runs its worker groups through here: a plain run's, each search
    trial's and the search's test group. A worker failure that ends the run shows the worker's own
    traceback once; bad input the workers found becomes a ConfigError (exit 2)."""
    from launcher import ray_job

    storage.mkdir(parents=True, exist_ok=True)
    try:
        ray_job.fit(cfg, worker, args, storage, name, on_report or ctl.receive, abort_reason, finished)
    except ray_job.Aborted:
        raise
    except (ray_job.LaunchError, RepeatedFailure, FailuresExhausted) as err:
        details = ctl.last_failure.details if ctl.last_failure else {}
        if not details:
            raise
        rank = min(details)
        print(details[rank].rstrip(), file=sys.stderr, flush=True)  # the worker's traceback, once
        raise ray_job.LaunchError(f"{err} (rank {rank}; every failure's traceback is in {ctl.failure_log})") from None
    if ctl.bad_input:
        raise ConfigError(ctl.bad_input)


def launch(cfg: RunConfig, opts: LaunchOptions, resume: Optional[str] = None) -> Outcome:
    """Preflight, train and test (one worker group), summarise."""
    from launcher import ray_job, run_lock

    started_at = time.time()
    out = Path(cfg.output_dir).resolve()
    stopper = Stopper(out / ".stop-request", cfg.train.stop_grace_s)
    # Signals are taken from here on, the same way in every phase: before training starts, a stop just
    # ends the launch; during training the workers checkpoint first; during the test evaluation the
    # final checkpoint exists already: the workers are abandoned, and --resume goes straight back to
    # the test. One launch at a time writes into an output directory (launcher/run_lock.py).
    with run_lock.held(out, say), stopper.installed(), storage_faults(out):
        resume_from = resolve_resume(out, resume)
        guard_output(out, resuming=resume is not None)
        paths, ctl = open_run(cfg, out, resume_from)
        say(ctl.tracker.describe())
        try:
            plan = preflight(cfg, paths, opts)
            ctl.tracker.params(run_params(cfg), run_tags(cfg, plan))
            if not stopper.requested:
                try:
                    ray_job.start_ray(opts.address, opts.verbose)  # keeps the launcher's signal handlers
                    if not stopper.requested:
                        train_and_test(cfg, paths, ctl, stopper, opts, plan.data_dir)
                finally:
                    ray_job.stop_ray()
                if ctl.test is None and not stopper.requested:
                    raise ray_job.LaunchError("the worker group ended without a test result")
            return summarise(cfg, paths, ctl, plan, final_checkpoint(paths), time.time() - started_at)
        finally:
            ctl.close()


class StorageFailed(Exception):
    """The run ended on a refused write; the message is the whole paragraph for the user."""


@contextlib.contextmanager
def storage_faults(out: Path):
    """A StorageError anywhere in the launch (the driver's writes, or a worker's) ends it with one
    paragraph: what, where, the OS error, the checkpoint to continue from, and what to do. Nothing in
    it needs the disk."""
    try:
        yield
    except StorageError as err:
        latest = checkpoints.find_checkpoints(out / "checkpoints")
        then = (f"the latest complete checkpoint is {latest[-1][1]} (step {latest[-1][0]}). Free space (or fix "
                f"the storage) and continue with: sft-launch <config> --output {out} --resume" if latest else
                "no checkpoint was completed yet. Free space (or fix the storage) and start the run again")
        raise StorageFailed(f"{err}. The storage refused the write, so the run stopped without restarting the "
                            f"workers; {then}") from None


def preflight(cfg: RunConfig, paths: Paths, opts: LaunchOptions):
    """Everything checkable before Ray starts (exit 2 on bad input); prints the plan and returns it."""
    from launcher import plan as plan_mod
    from trainer import data_cache

    say("preflight: checking data, tokenizer, model config and freezing rules")
    plan = plan_mod.make_plan(cfg, opts.cache_dir)
    check_disk(paths.out, plan.checkpoint_bytes)
    saved = None
    if paths.resume_from:
        check_resume(paths.resume_from, cfg, plan, paths.out)
        saved = checkpoints.read_state(paths.resume_from)
    with writing("the prepared data", data_cache.cache_root(cfg), refusals_only=True):
        plan = plan_mod.with_prepared_data(plan, cfg, data_cache.cache_root(cfg), say)
    for line in plan_mod.describe(plan, cfg).splitlines():
        say(line)
    if saved is not None:
        say(f"resuming from {paths.resume_from} (step {saved.step})")
    return plan


def train_and_test(cfg: RunConfig, paths: Paths, ctl: Controller, stopper: Stopper, opts: LaunchOptions,
                   data_dir: Optional[str]) -> None:
    """One worker group trains, then (unless stopped) evaluates the test split before fine-tuning and
    from the final sharded checkpoint on disk, with a fresh model, and rank 0 exports the model."""
    from launcher import ray_job

    def abort_reason() -> Optional[str]:
        if ctl.trained and stopper.requested:  # testing: the final checkpoint is safe already
            return "stop requested during the test evaluation"
        return stopper.abort_reason()

    say(f"training: {cfg.scaling.world_size} worker(s), checkpoints in {paths.checkpoints / paths.attempt}")
    args = training_args(paths, opts, data_dir, stopper.stop_file, test=True)
    try:
        run_group(cfg, ray_job.train_worker, args, paths.checkpoints, paths.attempt, ctl, abort_reason,
                  finished=lambda: ctl.test is not None or ctl.stopped)
    except ray_job.Aborted:
        if not ctl.trained:
            raise


def run_tags(cfg: RunConfig, plan) -> dict[str, str]:
    """What a tracker files beside the parameters: the run's size and what it trains on."""
    sources = ", ".join(str(source.path) for source in cfg.data.sources)
    return {"sft.world_size": str(cfg.scaling.world_size), "sft.trainable_parameters": str(plan.trainable),
            "sft.total_parameters": str(plan.total), "sft.model": checkpoints.model_identity(cfg.model),
            "sft.data": sources, "sft.prepared_data": str(plan.data_dir or "")}


def final_checkpoint(paths: Paths) -> Optional[Path]:
    """The newest complete checkpoint of the run (the resumed one when nothing was left to train)."""
    found = checkpoints.find_checkpoints(paths.checkpoints)
    return found[-1][1] if found else paths.resume_from


def summarise(cfg: RunConfig, paths: Paths, ctl: Controller, plan, final: Optional[Path], elapsed: float,
              extra: Optional[dict] = None) -> Outcome:
    """run_summary.json (and, for a completed run, test_metrics.json and the tracker's test scalars)."""
    step = checkpoints.read_state(final).step if final else 0
    summary = {
        "status": "completed" if ctl.test else "stopped",
        "global_step": step,
        "world_size": ctl.groups.world_size or cfg.scaling.world_size,  # the size the run ended with
        "nodes": cfg.scaling.nodes,
        "resizes": [r.as_json() for r in ctl.groups.resizes],
        "final_checkpoint": str(final) if final else None,
        "checkpoints": [str(p) for _, p in checkpoints.find_checkpoints(paths.checkpoints)],
        "checkpoint_bytes": {str(p): checkpoints.size_bytes(p) for _, p in checkpoints.find_checkpoints(paths.checkpoints)},
        "best_validation": ctl.best.as_json() if ctl.best else None,
        "stopped_early_at": ctl.stopped_early_at,
        "validation_history": [e.as_json() for e in ctl.history],
        "resumed_from": str(paths.resume_from) if paths.resume_from else None,
        "attempt": paths.attempt,
        "restarts": ctl.restarts,
        "ranks": [{"rank": r, **(dataclasses.asdict(w) if w else {})} for r, w in sorted(ctl.ranks.items())],
        "trainable_parameters": plan.trainable,
        "total_parameters": plan.total,
        "elapsed_s": round(elapsed, 1),
        "config": public_config(cfg),
        **(extra or {}),
    }
    if ctl.test:
        before, after = ctl.test.before, ctl.test.after
        # The checkpoint tested (test.checkpoint: the final one, or the best by validation) and its step.
        tested, step = ctl.test.checkpoint or str(final), ctl.test.step
        write_json(paths.out / "test_metrics.json", {"before": before, "after": after, "step": step,
                                                      "checkpoint": tested, "checkpoint_choice": cfg.test.checkpoint})
        if ctl.tracker is not None:
            ctl.tracker.scalars(test_scalars(before, after), step)
            ctl.tracker.commit(step)  # the tested checkpoint's step is final (a search's run has no other)
        summary.update(test={"before": before, "after": after}, final_model=str(paths.out / "final_model"),
                       tensorboard=str(paths.out / "tensorboard"))
    if ctl.tracker is not None:
        # Everything sent before the summary says what was lost; then the files go up.
        summary["tracking"] = {"report_to": list(cfg.tracking.report_to), "runs": ctl.tracker.runs,
                               "lost": ctl.tracker.flush(timeout_s=30.0)}
    write_json(paths.out / "run_summary.json", summary)
    if ctl.tracker is not None and ctl.test:
        with writing("the resolved config", paths.out / "resolved_config.yaml"):
            (paths.out / "resolved_config.yaml").write_text(yaml.safe_dump(public_config(cfg), sort_keys=False))
        for name in ("test_metrics.json", "run_summary.json", "test_generations.jsonl", "test_predictions.jsonl",
                     "generations", "resolved_config.yaml"):
            ctl.tracker.artifact(paths.out / name)
        if cfg.tracking.log_model:
            ctl.tracker.artifact(paths.out / "final_model")
    if ctl.test:
        changes = "  ".join(f"{k} {before[k]:.4g} -> {after[k]:.4g}" for k, v in after.items()
                            if isinstance(v, float) and k not in ("tokens", "examples", "perplexity"))
        say(f"test (step {step}): {changes}; results in {paths.out}")
    else:
        if final:
            say(f"stopped at step {step}; checkpoint {final}. Continue with: sft-launch <config> --output "
                f"{paths.out} --resume")
        else:
            say("stopped before the first checkpoint: nothing to resume; start the run again the same way")
    return Outcome(summary["status"], summary)
