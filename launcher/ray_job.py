"""Ray side: start or join a cluster, check its resources, run worker groups with Ray Train.

Owns everything that touches ray: the TorchTrainer for training and for test evaluation, the
reporting seam's Ray implementation, and the callback that forwards live metrics to the driver.
Imports ray inside functions (and never deepspeed) so `sft-launch --help` stays instant.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Callable, Optional

from trainer.config import ConfigError, RunConfig
from trainer.config_load import from_dict, to_dict
from trainer.jobs import WorkerArgs
from trainer.messages import (BadInput, GroupStarted, GroupStarting, LogLine, Received, StorageFailure, Where,
                              WorkerFailure, decode, encode)
from trainer.storage import as_storage_error, writing

# Environment for the driver, the raylet and every worker: quiet, and no Ray features we do not use.
RAY_ENV = {
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # prints would be shown twice
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",  # a report blocks until the controller polls
    "RAY_DEDUP_LOGS": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "PYTHONWARNINGS": "ignore",
    "RAY_CHDIR_TO_TRIAL_DIR": "0",  # a search trial runs where a plain run does (relative paths hold)
    "TUNE_DISABLE_SIGINT_HANDLER": "1",  # the launcher's own stop (checkpoint first) handles Ctrl-C
    # How long Ray Train waits for a worker group's placement before it decides again (default 60 s).
    # After a lost node its restart still counts the node until Ray's autoscaling coordinator looks at
    # the cluster again (every 20 s) and waits for a placement that cannot come; measured here with the
    # default: 60 s of the 72 s from a node's loss to the smaller group's first step. On a cluster
    # that has the resources a placement takes well under a second; a timeout is retried, not fatal.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10",
}

# The training workers' C allocator: tensors of 64 KiB and more are mapped, and unmapped when freed.
# glibc's default raises that threshold as tensors are freed (up to 32 MiB), so activations and
# optimizer temporaries come from heaps that keep what was freed: +0.9 GB resident per ZeRO-3 worker
# on SmolLM2-135M after 3 steps. An explicit value in the driver's environment wins.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


TRACKER_ENV = ("MLFLOW_", "WANDB_")  # variable prefixes passed on to every Ray process

TEARDOWN_WAIT_S = 60.0


class LaunchError(RuntimeError):
    """The cluster cannot run the job as asked (missing resources, a failed worker group)."""


def _quiet_worker_logs() -> None:
    """worker_process_setup_hook: silence loggers that print every second or on every import.

    Private Ray API, checked against Ray 2.60.0 (pyproject bounds Ray below 2.61): the internal
    logger names of Ray Train V2's placement-group cleaner and worker context."""
    for name in ("ray.train.v2._internal.execution.controller.placement_group_cleaner",
                 "ray.train", "ray.data", "DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Ray Train 2.60 names this logger by file path, so its log-level setting misses it: it would
    # print every report's full metrics twice per rank.
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def start_ray(address: Optional[str], verbose: bool = False) -> None:
    """Join `address` (or RAY_ADDRESS), else start a private local instance for this run.

    The workers' own output (library notices, per-rank bars, Ray's prefixes) reaches the console only
    with `verbose`; what the run says comes through the reporting seam instead."""
    # Ray reads its environment (auth mode and token above all) once, at import: set it first.
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    address = address or os.environ.get("RAY_ADDRESS")
    if not address and "RAY_AUTH_MODE" not in os.environ:
        import secrets

        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # per run, in memory only
    import ray

    # The trackers' own variables (MLFLOW_TRACKING_URI, WANDB_MODE, ...) reach every process that logs:
    # a search's trials log from their Tune actors.
    trackers = {k: v for k, v in os.environ.items() if k.startswith(TRACKER_ENV)}
    common = dict(logging_level=logging.ERROR, log_to_driver=verbose, configure_logging=True,
                  runtime_env={"env_vars": {**{k: os.environ.get(k, v) for k, v in WORKER_ENV.items()},
                                            **{k: os.environ[k] for k in RAY_ENV}, **trackers},
                               "worker_process_setup_hook": "launcher.ray_job._quiet_worker_logs"})
    if address:
        # SFT_NODE_IP: this host's address in the cluster, where Ray would guess another one (the
        # Slurm script sets it; on emulated nodes the loopback route hides the node's own address).
        node_ip = {"_node_ip_address": os.environ["SFT_NODE_IP"]} if os.environ.get("SFT_NODE_IP") else {}
        with _keeping_signal_handlers():
            ray.init(address=address, **node_ip, **common)
        return
    # The embedded default: a fresh instance for this run only (never attach to whatever runs on the
    # host), token authentication on, nodes addressed on 127.0.0.1, no dashboard.
    # Ctrl-C in a terminal reaches the whole process group, and Ray's daemons (GCS, raylet) are in
    # ours: started with SIGINT ignored (inherited across exec), they outlive the first Ctrl-C, which
    # the launcher turns into a checkpoint-and-stop.
    with _keeping_signal_handlers():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", **common)


@contextlib.contextmanager
def _keeping_signal_handlers():
    """ray.init replaces the SIGTERM handler twice: with its own Python one (sys.exit), then, when the
    core worker starts, with the C++ failure handler (it prints "*** SIGTERM received" and aborts, exit
    134). The launcher's handlers (checkpoint and stop) are put back once Ray has started, and a SIGTERM
    that Ray's Python handler took meanwhile (SystemExit) is handed to the launcher's as if it had come
    a moment later. (A SIGTERM in the last moments of ray.init, after the core worker starts, still
    meets the C++ handler: Ray offers no way to start without it.)"""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    late = False
    try:
        yield
    except SystemExit as exc:
        if exc.code != signal.SIGTERM or not callable(saved[signal.SIGTERM]):
            raise
        late = True
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
    if late:
        saved[signal.SIGTERM](signal.SIGTERM, None)


def stop_ray() -> None:
    """Stop the private instance, or disconnect from a cluster (also after a start cut short)."""
    import ray

    ray.shutdown()  # kills what this process started; harmless when nothing was


def cluster_gpus_per_node() -> list[float]:
    import ray

    return [n["Resources"].get("GPU", 0.0) for n in ray.nodes() if n.get("Alive")]


def check_resources(cfg: RunConfig, gpus_per_worker: float) -> list[str]:
    """The ids of the nodes that will host the workers (the first `scaling.nodes` that can hold
    `workers_per_node` workers each; an elastic run starts with `scaling.min_nodes` of them too). Fails
    within seconds, saying what is missing, when too few can."""
    import ray

    s = cfg.scaling
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    need_cpu, need_gpu = s.workers_per_node * s.cpus_per_worker, s.workers_per_node * gpus_per_worker
    fitting = [n["NodeID"] for n in nodes
               if n["Resources"].get("CPU", 0) >= need_cpu and n["Resources"].get("GPU", 0) >= need_gpu]
    fewest = s.min_world_size // s.workers_per_node
    if len(fitting) >= fewest:
        return fitting[:s.nodes]
    total_cpu = sum(n["Resources"].get("CPU", 0) for n in nodes)
    total_gpu = sum(n["Resources"].get("GPU", 0) for n in nodes)
    asked = f"{fewest} (scaling.min_nodes) to {s.nodes}" if s.is_elastic else f"{s.nodes}"
    raise LaunchError(
        f"the Ray cluster cannot place {asked} node(s) x {s.workers_per_node} worker(s): each node needs "
        f"{need_cpu:g} CPU(s){f' and {need_gpu:g} GPU(s)' if need_gpu else ''}, and {len(fitting)} of its "
        f"{len(nodes)} node(s) have that (cluster total: {total_cpu:g} CPUs, {total_gpu:g} GPUs). Lower "
        f"--nodes / --workers-per-node / scaling.cpus_per_worker, or add nodes to the cluster.")


def check_shared_storage(node_ids: list[str], directory: Path, key: str = "output_dir") -> None:
    """With several nodes, every node must see the output directory (checkpoints are written there by
    every rank and read back on resume) and the prepared data: a file the driver writes there must
    be visible on each node. `key` names the setting in messages."""
    import secrets

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = directory / f".shared-probe-{secrets.token_hex(4)}"
    probe.write_text("sft")

    @ray.remote(num_cpus=0)
    def sees(path: str) -> bool:
        return Path(path).is_file()

    try:
        seen = ray.get([sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False))
                        .remote(str(probe)) for n in node_ids], timeout=120)
    except ray.exceptions.GetTimeoutError:
        raise LaunchError(f"could not check within 120 s that every node sees {key} {directory}") from None
    finally:
        probe.unlink(missing_ok=True)
    blind = [n[:12] for n, ok in zip(node_ids, seen) if not ok]
    if blind:
        raise LaunchError(f"{key} {directory} is not shared storage: node(s) {', '.join(blind)} cannot see "
                          f"it. With --nodes > 1 it must be a path every node mounts (NFS, Lustre, ...).")


def placement(cfg: RunConfig, node_ids: list[str]) -> dict:
    """ScalingConfig placement: on one node, pack; on several, pin `workers_per_node` workers to each
    chosen node by its id label, which no placement strategy alone can express. An elastic run is
    placed by resources alone: on a resize Ray 2.60 keeps the first entries of a per-worker label
    list, which could pin the new group to the node that was lost."""
    s = cfg.scaling
    if s.nodes == 1:
        return {"placement_strategy": "PACK"}
    if s.is_elastic:
        return {"placement_strategy": "SPREAD"}
    return {"placement_strategy": "SPREAD",
            "label_selector": [{"ray.io/node-id": node_ids[i // s.workers_per_node]} for i in range(s.world_size)]}


def scaling_options(cfg: RunConfig, node_ids: list[str], gpus: float) -> dict:
    """Ray Train's ScalingConfig for `cfg`'s worker group, as keyword arguments (every group: a plain
    run's, each search trial's, a search's test group). An elastic run (scaling.min_nodes < nodes) gets
    Ray's worker range, resized at a failure and checked for growth every scaling.resize_check_s."""
    s = cfg.scaling
    elastic = {"num_workers": (s.min_world_size, s.world_size),
               "elastic_resize_monitor_interval_s": s.resize_check_s} if s.is_elastic else {"num_workers": s.world_size}
    return {**elastic, "use_gpu": gpus > 0, **placement(cfg, node_ids),
            "resources_per_worker": {"CPU": s.cpus_per_worker, **({"GPU": gpus} if gpus > 0 else {})}}


# ---------------------------------------------------------------- worker side


class RayReporter:
    """trainer.report.Reporter over ray.train.report; messages travel as dicts with where the rank
    runs. Console lines and step metrics go through the driver's queue at once (ray.train.report
    would block until the controller polls)."""

    def __init__(self, queue, checkpoint_root: Optional[str] = None):
        import ray

        self._queue, self._checkpoint_root = queue, checkpoint_root or "the run's checkpoint folder"
        self._where = Where(ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(),
                            socket.gethostname(), os.getpid())

    def report(self, message, checkpoint=None):
        import ray.train

        from trainer.checkpoints import dir_name

        if checkpoint is None:
            ray.train.report(encode(message, self._where))
            return
        # Ray copies this rank's folder into the run's storage (the output directory) inside report().
        with writing(f"the checkpoint of step {message.step}", self._checkpoint_root):
            ray.train.report(encode(message, self._where), checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint)),
                             checkpoint_dir_name=dir_name(message.step))

    def log(self, text, after_training=False):
        self._queue.actor.put_nowait.remote(LogLine(text, after_training))

    def track(self, metrics):
        self._queue.actor.put_nowait.remote(metrics)

    def refuse(self, message: str) -> None:
        """Bad input only this rank sees (a node without the shared storage): at once, through the queue."""
        import ray

        ray.get(self._queue.actor.put_nowait.remote(BadInput(message)))

    def storage_failure(self, failure: StorageFailure) -> None:
        """At once, through the queue: not through report(), whose calls every rank must pair."""
        import ray

        ray.get(self._queue.actor.put_nowait.remote(failure))


def _worker_args(loop_config: dict):
    args: WorkerArgs = loop_config["args"]
    if not args.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would probe for GPUs and warn
    return from_dict(loop_config["cfg"]), args, RayReporter(loop_config["queue"], args.checkpoint_root)


def _reporting_user_faults(reporter: RayReporter, body: Callable[[], object]) -> None:
    """Bad input found in a worker (a bad row past the preflight sample, say) is the user's to fix:
    report it and end normally, rather than raise and have Ray restart the group for nothing. Every
    rank prepares the same data, so every rank reports it at the same point. A write the storage
    refused is the user's too (trainer/storage.py): the rank that met it says so through the queue at
    once, and the driver ends the run. Any other error goes to Ray with its traceback as a note: Ray
    Train 2.60 hands its callbacks the bare exception."""
    import traceback

    try:
        body()
    except ConfigError as err:
        reporter.report(BadInput(str(err)))
    except Exception as err:
        refused = as_storage_error(err)
        if refused is not None:
            # A refused write (full disk, quota, read-only or failing storage) fails again after any
            # restart: the driver ends the run (stopping the other ranks) and says what to free.
            reporter.storage_failure(StorageFailure(refused.what, refused.where, refused.error))
            return
        err.add_note(traceback.format_exc().rstrip())
        raise


def _blind_to_shared_storage(args: WorkerArgs) -> Optional[str]:
    """Preflight checks shared storage on the nodes present at the start; a node that joins an elastic
    run later is checked by its own workers: what to tell the user when this one cannot see it."""
    if not args.shared_probe or Path(args.shared_probe).is_file():
        return None
    import ray

    return (f"node {socket.gethostname()} (Ray node {ray.get_runtime_context().get_node_id()[:12]}) does not see "
            f"output_dir {Path(args.shared_probe).parent}: it is not shared storage there. Every node that may join "
            f"the run (scaling.min_nodes < nodes: the group grows back onto nodes that join) must mount it")


def train_worker(loop_config: dict) -> None:
    import ray.train

    from trainer import loop

    cfg, args, reporter = _worker_args(loop_config)
    blind = _blind_to_shared_storage(args)
    if blind:  # this rank alone: at once through the queue (a report would wait for every rank's)
        reporter.refuse(blind)
        return
    latest = ray.train.get_checkpoint()  # set when Ray restarted the worker group mid-run
    if latest is not None:
        with latest.as_directory() as d:
            _reporting_user_faults(reporter, lambda: loop.fine_tune(cfg, reporter, dataclasses.replace(args, restart_from=d)))
    else:
        _reporting_user_faults(reporter, lambda: loop.fine_tune(cfg, reporter, args))


def test_worker(loop_config: dict) -> None:
    """The test evaluation alone, on `final_checkpoint` (a search's best trial)."""
    from trainer import loop

    cfg, args, reporter = _worker_args(loop_config)
    _reporting_user_faults(reporter, lambda: loop.run_test(cfg, reporter, args))


# ---------------------------------------------------------------- driver side


def _group_callback(q):
    from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback

    class Groups(ControllerCallback, WorkerGroupCallback):
        """Runs in Ray Train's controller; tells the driver of every worker group it is about to start
        and has started, with where each rank runs (an elastic run's resizes). Ray Train 2.60's internal
        callback interfaces (pyproject bounds Ray below 2.61): RunConfig.callbacks takes any
        RayTrainCallback; a UserCallback is wrapped and sees only reports and errors, any other one is
        handed to the controller and the worker group as it is."""

        def before_controller_execute_resize_decision(self, resize_decision):
            q.actor.put_nowait.remote(GroupStarting(resize_decision.num_workers))

        def after_worker_group_start(self, worker_group):
            q.actor.put_nowait.remote(GroupStarted(tuple(
                Where(w.metadata.node_id, w.metadata.node_ip, w.metadata.hostname, w.metadata.pid)
                for w in worker_group.get_workers())))

    return Groups()


def _forwarding_callback(q):
    from ray.train import UserCallback

    class Forward(UserCallback):
        """Runs in Ray Train's controller; hands every report to the driver through a queue actor, as
        the controller's typed message (one per report, each rank's part and place in it)."""

        def after_report(self, run_context, metrics, checkpoint):
            decoded = [decode(m) for m in metrics]
            q.actor.put_nowait.remote(Received(tuple(m for m, _ in decoded), tuple(w for _, w in decoded),
                                               checkpoint.path if checkpoint is not None else None))

        def after_exception(self, run_context, worker_exceptions):
            q.actor.put_nowait.remote(WorkerFailure({rank: describe_error(err) for rank, err in worker_exceptions.items()},
                                                    {rank: _traceback(err) for rank, err in worker_exceptions.items()}))

    return Forward()


def describe_error(err: BaseException) -> str:
    """One line: the error's type and the last line of what it says."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[-1] if text else ''}"


def _traceback(err: BaseException) -> str:
    """The worker's whole traceback (the note the worker added), else what the error says."""
    notes = getattr(err, "__notes__", None)
    return "\n".join(notes) if notes else f"{type(err).__name__}: {err}"


def _unwrap(err: BaseException) -> BaseException:
    """The user-facing error inside Ray's wrappers (a worker's ConfigError, say)."""
    failures = getattr(err, "worker_failures", None)
    if failures:
        err = failures[min(failures)]
    for _ in range(5):
        cause = getattr(err, "cause", None) or err.__cause__
        if cause is None or cause is err:
            break
        err = cause
    return err


class Aborted(LaunchError):
    """The driver gave up on the worker group (stop grace expired)."""


def gpus_per_worker(cfg: RunConfig) -> float:
    """scaling.gpus_per_worker, else one GPU per worker on a cluster that has GPUs (none on one without)."""
    s = cfg.scaling
    if s.gpus_per_worker is not None:
        return s.gpus_per_worker
    return 1.0 if any(cluster_gpus_per_node()) else 0.0


def in_background(name: str, work: Callable[[], object], tick: Callable[[], bool]) -> Optional[BaseException]:
    """Run a blocking Ray call (a TorchTrainer's or a Tuner's fit) in a daemon thread, so that the main
    thread keeps its signal handlers: `tick` runs while it works (it waits up to about half a second,
    and returns True once the caller has what it waited for; what it raises propagates at once).
    Returns the call's own error, None when it ended well or was left to end.

    A call left running after `tick` said done is given TEARDOWN_WAIT_S to end: stop_ray() frees the
    driver's core worker while Ray Train's fit() may still be blocked in Ray calls in this daemon
    thread; the process then crashed: SIGSEGV at exit on a joined cluster (the two-node test), SIGABRT
    seconds later in a process that goes on after an in-process launch (a CI run of the test suite);
    ray#31145. Ray Train's own teardown of the worker group ends first (~1 s)."""
    failed: list[BaseException] = []

    def target():
        try:
            work()
        except BaseException as err:  # handed to the main thread
            failed.append(err)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    while thread.is_alive():
        if tick():
            thread.join(timeout=TEARDOWN_WAIT_S)
            break
        thread.join(timeout=0.01)
    return failed[0] if failed else None


def fit(cfg: RunConfig, worker: Callable, args: WorkerArgs, storage: Path, name: str,
        on_report: Callable[[object], None], abort_reason: Callable[[], Optional[str]] = lambda: None,
        finished: Callable[[], bool] = lambda: False) -> None:
    """Run `worker` on the configured worker group; call `on_report` on the driver with every typed
    message (trainer/messages.py) the workers and Ray Train's controller send.

    A dead worker makes Ray restart the group from the latest checkpoint, up to train.max_failures
    times. `abort_reason` is polled: when it returns a reason, the run is abandoned. Once `finished()`
    says the driver has what it waits for (the last report), it returns without waiting seconds for
    Ray Train to tear the worker group down: stopping Ray (stop_ray) ends it.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Empty, Queue

    s = cfg.scaling
    gpus = gpus_per_worker(cfg)
    node_ids = check_resources(cfg, gpus)
    probe = None
    if s.nodes > 1:
        check_shared_storage(node_ids, Path(cfg.output_dir).resolve())
        if args.data_dir:
            check_shared_storage(node_ids, Path(args.data_dir), "data.cache_dir")
        probe = Path(cfg.output_dir).resolve() / f".shared-probe-{name}"  # for the nodes that join later
        probe.write_text("sft")
        args = dataclasses.replace(args, shared_probe=str(probe))
    # The queue lives on the driver's node (losing another node must not take it along); with one node
    # it fits in a search trial's placement group too.
    queue_options = {"num_cpus": 0}
    if s.nodes > 1:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        queue_options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False)
    q = Queue(actor_options=queue_options)
    args = dataclasses.replace(args, threads=s.cpus_per_worker, use_gpu=gpus > 0)
    trainer = TorchTrainer(
        train_loop_per_worker=worker,
        train_loop_config={"cfg": to_dict(cfg), "args": args, "queue": q},
        scaling_config=ray.train.ScalingConfig(**scaling_options(cfg, node_ids, gpus)),
        torch_config=TorchConfig(backend="nccl" if gpus > 0 else "gloo"),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(storage),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None),  # retention: controller
            # Ray charges a lost node to max_failures like any worker failure; for an elastic run the driver
            # counts only the failures that no resize absorbed (Controller.on_group_started).
            failure_config=ray.train.FailureConfig(max_failures=-1 if s.is_elastic else cfg.train.max_failures),
            callbacks=[_forwarding_callback(q), _group_callback(q)],
            logging_config=ray.train.LoggingConfig(log_level="WARNING")),
    )

    def drain(block_s: float) -> None:
        while True:
            try:
                item = q.get(timeout=block_s) if block_s else q.get_nowait()
            except Empty:
                return
            on_report(item)
            block_s = 0

    def tick() -> bool:
        drain(0.5)
        reason = abort_reason()
        if reason:
            raise Aborted(reason)
        return finished()

    try:
        error = in_background("ray-train-fit", trainer.fit, tick)
        drain(0)
    finally:
        if probe is not None:
            probe.unlink(missing_ok=True)
    if error is not None:
        inner = _unwrap(error)
        if isinstance(inner, ConfigError):
            raise inner
        raise LaunchError(describe_error(inner)) from error
