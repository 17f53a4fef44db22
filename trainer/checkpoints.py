"""Checkpoint contents and discovery.

A checkpoint folder holds DeepSpeed's sharded checkpoint (tag `ds`: each rank writes its own shard),
each rank's RNG states (`rng_rank<r>.pt`), and `trainer_state.json` (step, data position, metrics),
written by rank 0 after its shard. Ray merges the ranks' folders into one. A folder is complete only
once the orchestrator, having seen every rank's part persisted, writes the `.complete` marker: a
save interrupted at any point is never taken for the latest checkpoint. Imports torch inside
functions; never ray.
"""
from __future__ import annotations

import contextlib

import hashlib
import json
import random
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

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
    path = Path(path)
    try:
        state = read_state(path)
    except (OSError, ValueError, TypeError):
        return False
    return (((path / MARKER).is_file() or not marked) and (path / TAG).is_dir()
            and all((path / f"rng_rank{r}.pt").is_file() for r in range(state.world_size)))


def mark_complete(path: Path) -> None:
    """Called by the orchestrator once every rank's part of the checkpoint is persisted. An empty file:
    it exists whole or not at all, and a full disk still takes it (no data blocks)."""
    (Path(path) / MARKER).touch()


def _attempt(path: Path) -> int:
    """The launch that wrote a checkpoint (`.../attempt-<N>/step_...`); 0 outside that layout."""
    name = path.parent.name
    return int(name.split("-", 1)[1]) if name.startswith("attempt-") and name.split("-", 1)[1].isdigit() else 0


def find_checkpoints(root: Path, written_under: Optional[Path] = None) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root` (any depth) as (step, path), oldest first: by launch attempt,
    then step, so a run resumed from an earlier step never mistakes an older attempt's later step
    for its newest checkpoint. Under `written_under` (a worker's own launch, whose last checkpoint the
    orchestrator may not have marked yet) every fully written one counts."""
    root = Path(root)
    if not root.is_dir():
        return []
    mine = Path(written_under) if written_under is not None else None
    found = [(read_state(p).step, p) for p in root.rglob(f"{PREFIX}*")
             if p.is_dir() and is_complete(p, marked=mine is None or p.parent != mine)]
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


def load(engine, directory: Path, rank: int, load_optimizer: bool = True, universal: bool = False) -> TrainState:
    """Restore weights, optimizer, LR schedule and this rank's RNG streams; returns the saved state.

    `universal` reads the universal-format copy (written by the launcher when the world size changed);
    ranks the old run did not have keep their fresh RNG streams."""
    import numpy as np
    import torch

    directory = Path(directory)
    tag = UNIVERSAL_TAG if universal else TAG
    state = read_state(directory)
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


def best_checkpoint(root: Path, own: Path, metric: str, mode: str) -> Path | None:
    """The run's best checkpoint by validation `metric` (every launch's under `root`, this launch's
    `own` folder's too before the orchestrator marks them): the one retention keeps as best."""
    from trainer.early_stopping import score

    def look() -> Path | None:
        return best([(step, path, score(read_state(path).validation, metric, mode))
                     for step, path in find_checkpoints(root, written_under=own)])

    for _ in range(2):  # the orchestrator may delete a checkpoint (never the best) while we look
        try:
            return look()
        except (OSError, ValueError):
            pass
    return look()
