"""Checkpoint contents and discovery.

A checkpoint folder holds DeepSpeed's sharded checkpoint (tag `ds`: each rank writes its own shard),
each rank's RNG states (`rng_rank<r>.pt`), and `trainer_state.json` (step, data position, metrics),
written by rank 0 after its shard. Ray merges the ranks' folders into one. A folder is complete only
once the orchestrator, having seen every rank's part persisted, writes the `.complete` marker: a
save interrupted at any point is never taken for the latest checkpoint.

A checkpoint of another world size (ZeRO 1-3 partition the optimizer state by rank) is read through
DeepSpeed's universal format: on every (re)start the workers decide it themselves, and rank 0 converts
once (`universal_copy`). Which checkpoint the test evaluates comes from one function, `to_test`.
Imports torch inside functions; never ray.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from trainer.config import ConfigError
from trainer.early_stopping import carry_over, counted, score
from trainer.storage import StorageError, writing

TAG = "ds"
UNIVERSAL_TAG = "ds_universal"  # DeepSpeed's universal format, made beside TAG to change world size
STATE_FILE = "trainer_state.json"
MARKER = ".complete"
PREFIX = "step_"


@dataclass
class TrainState:
    step: int  # optimizer steps taken
    micro_step: int  # micro-batches consumed per rank
    world_size: int
    zero_stage: int
    model: str  # what was trained, to refuse resuming another model's checkpoint
    validation: dict = field(default_factory=dict)  # the validation metrics at this step, if it evaluated
    trainable: str = ""  # digest of the trainable parameter names (the freezing rules' outcome)
    epoch: int = 0  # the data position: epoch, and places of its permutation consumed by all ranks
    position: int = 0
    # Only the trainable parameters (and their optimizer state) are in the shards; the frozen ones
    # are rebuilt from the base model (or, for an inline architecture, from the seed) on load.
    lean: bool = False
    # Early stopping (train.early_stopping): the best value of its metric so far, the evaluations
    # since it last improved, and whether the run stopped at this step because of it.
    best_metric: Optional[float] = None
    bad_evaluations: int = 0
    best_of: Optional[str] = None  # "metric/mode" that best_metric counts (a resume may change them)
    stopped_early: bool = False


def is_lean(cfg) -> bool:
    """Checkpoints leave the frozen weights out when they can be rebuilt from pretrained weights
    (an inline architecture has none: its frozen weights are saved)."""
    return cfg.finetune.mode in ("local", "lora") and cfg.model.name_or_path is not None


def size_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def model_identity(model_cfg) -> str:
    """What a checkpoint belongs to: the pretrained source, or the inline architecture itself."""
    if model_cfg.name_or_path is not None:
        return f"{model_cfg.name_or_path}{'#' + model_cfg.gguf_file if model_cfg.gguf_file else ''}:{model_cfg.task}"
    arch = json.dumps(model_cfg.architecture, sort_keys=True)
    return f"architecture:{hashlib.sha256(arch.encode()).hexdigest()[:12]}:{model_cfg.task}"


def trainable_digest(names) -> str:
    return hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()[:16]


def corrupted_files(path: Path) -> list[Path]:
    """Checkpoint files that are not complete torch archives (truncated, overwritten, empty)."""
    bad = []
    for f in sorted(Path(path).rglob("*.pt")):
        try:
            with zipfile.ZipFile(f) as archive:
                archive.namelist()
        except (zipfile.BadZipFile, OSError):
            bad.append(f)
    return bad


def dir_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def read_state(path: Path) -> TrainState:
    return TrainState(**json.loads((Path(path) / STATE_FILE).read_text()))


def is_complete(path: Path, marked: bool = True) -> bool:
    """`marked=False`: every part is written, but the orchestrator may not have marked it yet."""
    return _complete_state(Path(path), marked) is not None


def _complete_state(path: Path, marked: bool) -> Optional[TrainState]:
    """The saved state of a complete checkpoint; None for an incomplete (or vanished) one."""
    try:
        state = read_state(path)
    except (OSError, ValueError, TypeError):
        return None
    complete = (((path / MARKER).is_file() or not marked) and (path / TAG).is_dir()
                and all((path / f"rng_rank{r}.pt").is_file() for r in range(state.world_size)))
    return state if complete else None


def mark_complete(path: Path) -> None:
    """Called by the orchestrator once every rank's part of the checkpoint is persisted. An empty file:
    it exists whole or not at all, and a full disk still takes it (no data blocks)."""
    (Path(path) / MARKER).touch()


def partial_after_latest(root: Path) -> list[Path]:
    """Checkpoint folders under `root` that the orchestrator never marked complete and that are newer
    than the latest complete one of the same launch (attempt folder): what a worker group that failed
    while checkpointing left. A group of another size that replays the step writes into the same folder,
    and the dead group's extra ranks' shards would stay beside its own (DeepSpeed's universal conversion
    then reads both). Per launch: one resumed from an earlier step (`--resume PATH`) replays steps below
    the latest of the launch it resumed."""
    complete = find_checkpoints(root)
    newest: dict[Path, int] = {}
    for step, path in complete:
        newest[path.parent] = max(step, newest.get(path.parent, 0))
    marked = {path for _, path in complete}
    found = []
    for folder, subfolders, _ in os.walk(root):
        steps = [name for name in subfolders if name.startswith(PREFIX)]
        subfolders[:] = [name for name in subfolders if not name.startswith(PREFIX)]
        for name in steps:
            path = Path(folder) / name
            step = name[len(PREFIX):]
            if path not in marked and step.isdigit() and int(step) > newest.get(path.parent, 0):
                found.append(path)
    return sorted(found)


def _attempt(path: Path) -> int:
    """The launch that wrote a checkpoint (`.../attempt-<N>/step_...`); 0 outside that layout."""
    name = path.parent.name
    return int(name.split("-", 1)[1]) if name.startswith("attempt-") and name.split("-", 1)[1].isdigit() else 0


def find_checkpoints(root: Path, written_under: Optional[Path] = None) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root` (any depth) as (step, path), oldest first: by launch attempt,
    then step, so a run resumed from an earlier step never mistakes an older attempt's later step
    for its newest checkpoint. Under `written_under` (a worker's own launch, whose last checkpoint the
    orchestrator may not have marked yet) every fully written one counts. A folder deleted while this
    looks (the orchestrator prunes) is left out, not an error: os.walk skips what it cannot list."""
    mine = Path(written_under) if written_under is not None else None
    found = []
    for folder, subfolders, _ in os.walk(root):
        steps = [name for name in subfolders if name.startswith(PREFIX)]
        subfolders[:] = [name for name in subfolders if not name.startswith(PREFIX)]  # never into a checkpoint
        for name in steps:
            path = Path(folder) / name
            state = _complete_state(path, marked=mine is None or path.parent != mine)
            if state is not None:
                found.append((state.step, path))
    return sorted(found, key=lambda sp: (_attempt(sp[1]), sp[0], str(sp[1])))


@contextlib.contextmanager
def _frozen_aliases_excluded(engine):
    """DeepSpeed's exclude_frozen_parameters drops the names `named_parameters()` gives, which lists
    a tied tensor once: the alias of a frozen one (a causal LM's lm_head.weight, tied to the frozen
    embeddings) would still be written. For the save, drop every name of a frozen tensor."""
    own = engine.module_state_dict

    def lean_state_dict(*args, exclude_frozen_parameters=False, **kwargs):
        sd = own(*args, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)
        if exclude_frozen_parameters and sd is not None:
            for name, p in engine.module.named_parameters(remove_duplicate=False):
                if not p.requires_grad:
                    sd.pop(name, None)
        return sd

    engine.module_state_dict = lean_state_dict
    try:
        yield
    finally:
        del engine.module_state_dict  # the class's method again


def save(engine, directory: Path, state: TrainState, rank: int) -> None:
    """Write this rank's part of a checkpoint into `directory` (every rank calls this)."""
    import numpy as np
    import torch

    with _frozen_aliases_excluded(engine):
        engine.save_checkpoint(str(directory), tag=TAG, exclude_frozen_parameters=state.lean)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    torch.save(rng, Path(directory) / f"rng_rank{rank}.pt")
    if rank == 0:
        (Path(directory) / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))


def load(engine, directory: Path, rank: int, load_optimizer: bool = True) -> TrainState:
    """Restore weights, optimizer, LR schedule and this rank's RNG streams; returns the saved state.

    An engine built with DeepSpeed's load_universal reads the universal copy (`universal_copy` made it:
    the world size changed); ranks the old run did not have keep their fresh RNG streams."""
    import numpy as np
    import torch

    directory = Path(directory)
    tag = UNIVERSAL_TAG if engine.load_universal_checkpoint() else TAG
    state = read_state(directory)
    if not load_optimizer and own_partition_fits(engine, state):
        load_partition_weights(engine, directory, tag)
        return state
    # A lean checkpoint lacks the frozen weights: the engine's model already holds them.
    load_path, _ = engine.load_checkpoint(str(directory), tag=tag, load_optimizer_states=load_optimizer,
                                          load_lr_scheduler_states=load_optimizer, load_module_strict=not state.lean)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint in {directory / tag}")
    rng_file = directory / f"rng_rank{rank}.pt"
    if load_optimizer and rng_file.is_file():
        rng = torch.load(rng_file, weights_only=False)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return state


def own_partition_fits(engine, state: TrainState) -> bool:
    """Whether the weights alone can come from this rank's own shard: ZeRO-3 (parameters partitioned,
    no NVMe swapping), the checkpoint written by as many ranks as this engine has, not through the
    universal format. Elsewhere DeepSpeed's load_checkpoint is used. ZeRO partitions over the
    sequence-and-data-parallel group (the whole world; DeepSpeed's dp_world_size is None under Ulysses)."""
    optimizer = getattr(engine, "optimizer", None)
    return (engine.zero_optimization_partition_weights() and not engine.load_universal_checkpoint()
            and state.world_size == engine.seq_dp_world_size and hasattr(optimizer, "fp32_partitioned_groups_flat")
            and not getattr(optimizer, "swap_optimizer", False) and not getattr(optimizer, "offload_param", False))


def load_partition_weights(engine, directory: Path, tag: str) -> None:
    """The weights of a ZeRO-3 checkpoint into `engine` (same world size), each rank reading only its own
    shard of the fp32 masters, memory-mapped (the Adam moments beside them are never read): the test
    phase's load (#27).

    DeepSpeed's load_checkpoint without optimizer states consolidates the whole fp32 model on every
    rank (zero_to_fp32 over every rank's shard, then a gather into the partitions), so the test phase
    held a second full model per rank at the load: 0.95 GB of a SmolLM2-135M worker's 2.7 GB peak.
    DeepSpeed 0.19.8 (private): the file names come from the engine's own `_get_zero_ckpt_name` /
    `_get_ckpt_name`, and the copy from the fp32 partition into the weights' partition is stage 3's
    `_rigid_load_state_dict` without optimizer states, as its load_state_dict does on the same world
    size; around it the checkpoint event hooks load_checkpoint calls. Buffers come from this rank's
    model-states file (trained statistics such as batch norm's)."""
    import torch

    optimizer = engine.optimizer
    shard = torch.load(engine._get_zero_ckpt_name(str(directory), tag), map_location="cpu", mmap=True,
                       weights_only=False)
    optimizer.checkpoint_event_prologue()
    optimizer._rigid_load_state_dict(shard["optimizer_state_dict"], load_optimizer_states=False)
    if optimizer.persistent_parameters:
        optimizer.persistent_parameters[0].partition(optimizer.persistent_parameters)
    optimizer.checkpoint_event_epilogue()
    del shard
    states = torch.load(engine._get_ckpt_name(str(directory), tag), map_location="cpu", mmap=True,
                        weights_only=False)
    saved = states.get("module") or {}
    with torch.no_grad():
        for name, buffer in engine.module.named_buffers():
            if name in saved and saved[name].shape == buffer.shape:
                buffer.copy_(saved[name])


def restore(engine, directory: Optional[str], fresh: TrainState, rank: int, early,
            log: Callable[[str], None]) -> TrainState:
    """Where training goes on from: `fresh` (step 0) without a checkpoint, else the checkpoint's state
    with its weights, optimizer, LR schedule and RNG streams loaded (`load`), and this run's own facts
    (trainable digest, world size, lean). Early stopping's best and patience (`early`, the config's
    train.early_stopping) carry over when its metric and mode stay (trainer/early_stopping.py)."""
    state = fresh
    if directory:
        state = load(engine, Path(directory), rank)
        state.trainable, state.world_size, state.lean = fresh.trainable, fresh.world_size, fresh.lean
        log(f"resumed from {directory} at step {state.step}")
    if early is not None:
        kept = carry_over(state.best_metric, state.bad_evaluations, state.best_of, early)
        if state.best_metric is not None and kept[0] is None:
            log(f"early stopping now counts {counted(early)}, not {state.best_of}: patience starts again")
        (state.best_metric, state.bad_evaluations), state.best_of = kept, counted(early)
    return state


def universal_copy(path: Path, model: str, world: int, rank: int, log: Callable[[str], None]) -> bool:
    """Whether this world reads checkpoint `path` in DeepSpeed's universal format (decided before the
    engine is built: DeepSpeed's load_universal is part of its config). ZeRO 1-3 partition the
    optimizer state by rank, so a checkpoint of another world size needs it; then rank 0 converts
    (once: a copy already made is kept) while the others wait. Every rank calls this at the same point
    and ends the same way: rank 0 sends the outcome to all, so a failed conversion raises the same
    ConfigError or StorageError on every rank instead of leaving the others waiting. A checkpoint of
    another model is refused here, before anything is converted."""
    import torch.distributed as dist

    saved = read_state(path)
    if saved.model != model:
        raise ConfigError(f"{path} holds a checkpoint of {saved.model!r}, not of {model!r}")
    if saved.world_size == world or saved.zero_stage == 0:
        return False
    outcome: list = [None]
    if rank == 0:
        try:
            if not (path / UNIVERSAL_TAG / "zero").is_dir():
                log(f"converting {path} (written by {saved.world_size} worker(s)) to DeepSpeed's universal format "
                    f"for the new world size ({world})")
                convert_to_universal(path)
        except ConfigError as err:
            outcome = [("config", str(err))]
        except StorageError as err:
            outcome = [("storage", err.what, err.where, err.error)]
        except Exception as err:
            outcome = [("other", f"{type(err).__name__}: {err}")]
            dist.broadcast_object_list(outcome, src=0)
            raise
    dist.broadcast_object_list(outcome, src=0)  # the others wait here for rank 0's conversion
    if outcome[0] is not None:
        kind, *details = outcome[0]
        if kind == "config":
            raise ConfigError(details[0])
        if kind == "storage":
            raise StorageError(*details)
        raise RuntimeError(f"rank 0 failed to convert {path} to the universal format ({details[0]})")
    return True


def convert_to_universal(path: Path) -> None:
    """Convert a sharded checkpoint to DeepSpeed's universal format, beside the original
    (`ds_universal/`): staged, then renamed, so a conversion cut short is never taken for one."""
    target = path / UNIVERSAL_TAG
    staging = path / f".{UNIVERSAL_TAG}-converting"
    shutil.rmtree(staging, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                           str(path / TAG), "--output_folder", str(staging), "--inject_missing_state"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        # A conversion that ran out of space is a storage fault, not a bad checkpoint: a probe of the
        # same size class (1 MiB) beside it tells, without reading the converter's message.
        with writing("the universal conversion of the checkpoint", staging.parent):
            probe = staging.parent / f".{UNIVERSAL_TAG}-probe"
            try:
                probe.write_bytes(bytes(2**20))
            finally:
                probe.unlink(missing_ok=True)
        raise ConfigError(f"{path}: converting the checkpoint to DeepSpeed's universal format failed ({tail})")
    with writing("the universal conversion of the checkpoint", path):
        shutil.rmtree(target, ignore_errors=True)  # a conversion left half-done by an earlier launch
        staging.rename(target)


def retained(checkpoints: list[tuple[int, Path, float | None]], keep_last: int,
             protected: set[Path] = frozenset()) -> set[Path]:
    """Which checkpoints to keep, given (step, path, score) oldest first: the newest `keep_last`, the
    best by validation score (trainer/early_stopping.py: lower is better), and any protected one (the
    checkpoint being resumed from). Pure; the caller deletes the rest."""
    keep = {p for _, p, _ in checkpoints[-keep_last:]}
    if best(checkpoints) is not None:
        keep.add(best(checkpoints))
    return keep | (set(protected) & {p for _, p, _ in checkpoints})


def best(checkpoints: list[tuple[int, Path, float | None]]) -> Path | None:
    """The best of (step, path, score) by score, lower is better (the later one on a tie); None when
    none has a score. Retention keeps it; test.checkpoint: best tests it."""
    scored = [c for c in checkpoints if c[2] is not None]
    return min(scored, key=lambda c: (c[2], -c[0]))[1] if scored else None


def best_checkpoint(root: Path, own: Optional[Path], metric: str, mode: str) -> Path | None:
    """The run's best checkpoint by validation `metric` (every launch's under `root`, this launch's
    `own` folder's too before the orchestrator marks them): the one retention keeps as best."""
    scored = []
    for step, path in find_checkpoints(root, written_under=own):
        try:
            scored.append((step, path, score(read_state(path).validation, metric, mode)))
        except (OSError, ValueError, TypeError):
            continue  # pruned while we looked: never the best (see to_test)
    return best(scored)


def to_test(root: Path, own: Optional[Path], choice: str, metric: str, mode: str, final: Path) -> Path:
    """The checkpoint the test evaluates: `final` (the run's last) for test.checkpoint: final, else the
    best by validation `metric` under `root` (`own`: the launch whose last checkpoints count before
    the orchestrator marks them), or `final` when no checkpoint measured it. The one source for the
    workers (trainer/loop.py fine_tune) and a search's best-trial test (launcher/tune.py).

    No retry is needed while the orchestrator prunes: it deletes only what retention drops (checkpoints
    .retained), never the newest nor the best by this same metric, and it deletes a best only once a
    better checkpoint is complete, which this then finds. Every checkpoint it lists is complete when
    the test starts (the ranks wrote theirs and met at a barrier), so none appears while it looks; one
    that vanishes while it looks was pruned, hence not the best, and is skipped."""
    if choice == "best":
        return best_checkpoint(root, own, metric, mode) or Path(final)
    return Path(final)
