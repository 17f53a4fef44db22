"""What a worker is asked to do beyond the config: one typed value, built once on the driver.

The driver (launcher/controller.py, launcher/tune.py) builds a `WorkerArgs`; Ray hands it to every
worker as it is (pickled), and the worker loop (trainer/loop.py) reads it. Imports only the stdlib.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class WorkerArgs:
    """What a worker needs beyond the config: where things are, and where to start from."""
    cache_dir: str
    data_dir: Optional[str] = None  # the prepared data (trainer/data_cache.py); None: prepare in memory
    resume_from: Optional[str] = None  # a checkpoint folder chosen by --resume
    restart_from: Optional[str] = None  # the orchestrator's latest checkpoint after a worker restart
    export_dir: Optional[str] = None  # run_test: where rank 0 writes the consolidated model
    predictions_path: Optional[str] = None  # run_test: where rank 0 writes the test predictions
    generations_dir: Optional[str] = None  # run: where rank 0 writes each evaluation's generated answers
    test_generations_path: Optional[str] = None  # run_test: where rank 0 writes the test answers
    stop_file: Optional[str] = None  # when it exists, every rank checkpoints after this step and stops
    final_checkpoint: Optional[str] = None  # run_test: the checkpoint to evaluate
    checkpoint_root: Optional[str] = None  # fine_tune: where this launch's checkpoints are persisted
    test_after: bool = True  # fine_tune: go on to the test evaluation (a search trial does not)
    threads: int = 1  # CPU threads per worker (scaling.cpus_per_worker)
    use_gpu: bool = False  # the worker has a GPU (then nccl); else DeepSpeed is told to use the CPU
    verbose: bool = False  # keep the libraries' own progress bars and notices
    # A file the driver keeps in output_dir while the group runs (several nodes): a worker that cannot
    # see it runs on a node without the shared storage (one that joined an elastic run later, say).
    shared_probe: Optional[str] = None
