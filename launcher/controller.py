"""The controller: runs a job from preflight to the final summary, on the driver.

It receives validation metrics while training runs (one printed line per evaluation), tracks the
best, prunes checkpoints (last keep_last + best), then runs the test evaluation on the final sharded
checkpoint in a fresh worker group and writes test_metrics.json, run_summary.json, TensorBoard test
scalars and the exported model. Never imports deepspeed.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from launcher.config import ConfigError, RunConfig, to_dict
from trainer import checkpoints

def _say(text: str) -> None:
    print(f"[sft] {text}", flush=True)


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


def guard_output(out: Path, resuming: bool) -> None:
    """A new run never overwrites what an earlier run left in its output directory."""
    if not resuming and (checkpoints.find_checkpoints(out / "checkpoints") or (out / "run_summary.json").exists()):
        raise ConfigError(f"output_dir {out} already holds a run; pass --resume to continue it, or choose "
                          f"another directory with --output")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"output_dir {out}: not writable ({err.strerror})") from None


def check_resume(path: Path, cfg: RunConfig, plan) -> None:
    """Refuse, before any worker starts, a checkpoint that cannot continue this config."""
    state = checkpoints.read_state(path)
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
        raise ConfigError(f"--resume {path}: corrupted checkpoint file(s): {', '.join(str(b) for b in bad[:3])}; "
                          f"resume from an earlier checkpoint with --resume PATH")


def ensure_universal(path: Path) -> None:
    """Convert a sharded checkpoint to DeepSpeed's universal format once, cached beside the original
    (`ds_universal/`), so it loads on any number of workers with its optimizer state."""
    import subprocess
    import sys

    target = path / checkpoints.UNIVERSAL_TAG
    if (target / "zero").is_dir():
        return
    staging = path / f".{checkpoints.UNIVERSAL_TAG}-converting"
    shutil.rmtree(staging, ignore_errors=True)
    _say(f"converting {path} to DeepSpeed's universal format for the new world size")
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                           str(path / checkpoints.TAG), "--output_folder", str(staging), "--inject_missing_state"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"--resume {path}: converting the checkpoint to the universal format failed ({tail})")
    shutil.rmtree(target, ignore_errors=True)  # a conversion left half-done by an earlier launch
    staging.rename(target)


def check_disk(out: Path, needed: int) -> None:
    free = shutil.disk_usage(out).free
    if free < needed:
        raise ConfigError(f"output_dir {out}: {free / 2**30:.2f} GiB free, but one checkpoint needs about "
                          f"{needed / 2**30:.2f} GiB; free space or choose another --output")


@dataclass
class Controller:
    cfg: RunConfig
    out: Path
    protected: set = field(default_factory=set)
    history: list = field(default_factory=list)
    best: Optional[dict] = None
    ranks: dict = field(default_factory=dict)
    last_checkpoint: Optional[Path] = None
    stopped_at: Optional[int] = None
    restarts: int = 0
    config_error: Optional[str] = None
    test: dict = field(default_factory=dict)

    def on_test_report(self, item: dict) -> None:
        if "failures" in item:
            self.on_failure(item["failures"])
        elif "config_error" in item["metrics"][0]:
            self.config_error = item["metrics"][0]["config_error"]
        else:
            self.test = item["metrics"][0]

    def on_train_report(self, item: dict) -> None:
        if "failures" in item:
            self.on_failure(item["failures"])
            return
        if "config_error" in item["metrics"][0]:
            self.config_error = item["metrics"][0]["config_error"]
            return
        per_rank = item["metrics"]
        for rank, m in enumerate(per_rank):
            self.ranks[rank] = m.get("where")
        m = per_rank[0]
        if m.get("stopped"):
            self.stopped_at = int(m["step"])
        if "val_loss" in m:
            entry = {"step": int(m["step"]), **{k[4:]: v for k, v in m.items() if k.startswith("val_")}}
            # After a restart the steps past the checkpoint run again: keep one entry per step.
            self.history = [h for h in self.history if h["step"] != entry["step"]] + [entry]
            if self.best is None or entry["loss"] < self.best["loss"]:
                self.best = dict(entry)
            shown = "  ".join(f"{k} {v:.4g}" for k, v in entry.items() if k not in ("step", "loss"))
            _say(f"eval  step {entry['step']}: val loss {entry['loss']:.4f}  {shown}  (best {self.best['loss']:.4f} "
                 f"at step {self.best['step']})")
        if item["checkpoint"]:
            self.last_checkpoint = Path(item["checkpoint"])
            checkpoints.mark_complete(self.last_checkpoint)  # every rank's part is persisted now
            if self.best is not None and self.best["step"] == int(m["step"]):
                self.best["checkpoint"] = str(self.last_checkpoint)
            self.prune()

    def on_failure(self, failures: dict) -> None:
        self.restarts += 1
        latest = checkpoints.find_checkpoints(self.out / "checkpoints")
        where = f"step {latest[-1][0]}" if latest else "the start"
        detail = "; ".join(f"rank {r}: {msg}" for r, msg in sorted(failures.items()))
        if self.restarts > self.cfg.train.max_failures:
            _say(f"worker failure ({detail}); train.max_failures = {self.cfg.train.max_failures} reached")
        else:
            _say(f"worker failure ({detail}); restart {self.restarts}/{self.cfg.train.max_failures}: "
                 f"the worker group continues from the latest checkpoint ({where})")

    def prune(self) -> None:
        found = checkpoints.find_checkpoints(self.out / "checkpoints")
        scored = [(step, path, checkpoints.read_state(path).metrics.get("val_loss")) for step, path in found]
        keep = checkpoints.retained(scored, self.cfg.train.keep_last,
                                    self.protected | ({self.last_checkpoint} if self.last_checkpoint else set()))
        for _, path, _ in scored:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)


class Stopper:
    """SIGTERM, SIGUSR1 (what Slurm sends before preemption or the time limit) and Ctrl-C ask the
    workers to finish the current step, checkpoint and stop; a second Ctrl-C aborts at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, stop_file: Path, grace_s: float):
        self.stop_file, self.grace_s = stop_file, grace_s
        self.deadline: Optional[float] = None

    def _handle(self, signum, frame) -> None:
        if self.deadline is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.deadline = time.monotonic() + self.grace_s
        self.stop_file.write_text(f"{signal.Signals(signum).name}\n")
        _say(f"{signal.Signals(signum).name}: the workers checkpoint after the current step and stop "
             f"(grace {self.grace_s:g} s; Ctrl-C again aborts at once)")

    @property
    def requested(self) -> bool:
        return self.deadline is not None

    def abort_reason(self) -> Optional[str]:
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


def _next_attempt(root: Path) -> int:
    """One more than any attempt so far: a reused name would make Ray restore that attempt's state."""
    numbers = [int(p.name.split("-", 1)[1]) for p in root.glob("attempt-*") if p.name.split("-", 1)[1].isdigit()]
    return max(numbers, default=0) + 1


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def _tensorboard_test(out: Path, step: int, before: dict, after: dict) -> None:
    """test/<metric> at the final step; test_before/<metric> beside it for comparison."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out / "tensorboard")) as writer:
        for prefix, metrics in (("test", after), ("test_before", before)):
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and k not in ("tokens", "examples"):
                    writer.add_scalar(f"{prefix}/{k}", v, step)


def launch(cfg: RunConfig, address: Optional[str], resume: Optional[str], cache_dir: str) -> dict:
    """Preflight, train, test, export. Returns the run summary."""
    from launcher import plan as plan_mod
    from launcher import ray_job

    started_at = time.time()
    out = Path(cfg.output_dir).resolve()
    resume_from = resolve_resume(out, resume)
    guard_output(out, resuming=resume is not None)
    ckpt_root = out / "checkpoints"
    attempt = f"attempt-{_next_attempt(ckpt_root)}"
    ctl = Controller(cfg, out, protected={resume_from} if resume_from else set())
    stopper = Stopper(out / ".stop-request", cfg.train.stop_grace_s)

    def stopped(final: Optional[Path], step: int) -> dict:
        where = f"checkpoint {final}" if final else "no checkpoint yet"
        _say(f"stopped at step {step}; {where}. Continue with: sft-launch <config> --output {out} --resume")
        summary = {"status": "stopped", "global_step": step, "final_checkpoint": str(final) if final else None,
                   "world_size": cfg.scaling.world_size, "validation_history": ctl.history, "attempt": attempt,
                   "restarts": ctl.restarts, "ranks": [{"rank": r, **(w or {})} for r, w in sorted(ctl.ranks.items())],
                   "config": to_dict(cfg)}
        _write_json(out / "run_summary.json", summary)
        return summary

    # Signals are taken from here on: before training starts, a stop just ends the launch; during
    # training the workers checkpoint first; during the test evaluation the final checkpoint exists
    # already, and --resume goes straight back to the test.
    with stopper.installed():
        _say("preflight: checking data, tokenizer, model config and freezing rules")
        plan = plan_mod.make_plan(cfg, cache_dir)
        for line in plan_mod.describe(plan, cfg).splitlines():
            _say(line)
        check_disk(out, plan.checkpoint_bytes)
        universal = False
        if resume_from:
            check_resume(resume_from, cfg, plan)
            saved = checkpoints.read_state(resume_from)
            universal = saved.world_size != cfg.scaling.world_size and saved.zero_stage > 0
            if universal:
                ensure_universal(resume_from)
            _say(f"resuming from {resume_from} (step {saved.step})")
        if stopper.requested:
            return stopped(resume_from, checkpoints.read_state(resume_from).step if resume_from else 0)

        ckpt_root.mkdir(parents=True, exist_ok=True)
        ray_job.start_ray(address)
        try:
            _say(f"training: {cfg.scaling.world_size} worker(s), checkpoints in {ckpt_root / attempt}")
            ray_job.fit(cfg, ray_job.train_worker,
                        {"cache_dir": cache_dir, "tensorboard_dir": str(out / "tensorboard"),
                         "resume_from": str(resume_from) if resume_from else None,
                         "stop_file": str(stopper.stop_file), "universal": universal},
                        ckpt_root, attempt, ctl.on_train_report, stopper.abort_reason)
            if ctl.config_error:
                raise ConfigError(ctl.config_error)
            found = checkpoints.find_checkpoints(ckpt_root)
            if found:
                final_step, final = found[-1]
            elif resume_from:  # resumed at the end of its schedule: nothing was left to train
                final_step, final = checkpoints.read_state(resume_from).step, resume_from
            else:
                raise ray_job.LaunchError("training ended without a complete checkpoint")
            if ctl.stopped_at is not None or stopper.requested:
                return stopped(final, final_step)
            _say(f"test evaluation on the final checkpoint {final} (and on the model before fine-tuning)")
            with tempfile.TemporaryDirectory(prefix="sft-test-") as scratch:
                try:
                    ray_job.fit(cfg, ray_job.test_worker,
                                {"cache_dir": cache_dir, "final_checkpoint": str(final),
                                 "export_dir": str(out / "final_model"),
                                 "predictions_path": str(out / "test_predictions.jsonl")},
                                Path(scratch), "test", ctl.on_test_report,
                                lambda: "stop requested" if stopper.requested else None)
                except ray_job.Aborted:
                    return stopped(final, final_step)
            if ctl.config_error:
                raise ConfigError(ctl.config_error)
        finally:
            ray_job.stop_ray()

    test = ctl.test
    before, after = test["before"], test["after"]
    _write_json(out / "test_metrics.json", {"before": before, "after": after, "step": final_step,
                                            "checkpoint": str(final)})
    _tensorboard_test(out, final_step, before, after)
    summary = {
        "status": "completed",
        "global_step": final_step,
        "world_size": cfg.scaling.world_size,
        "nodes": cfg.scaling.nodes,
        "final_checkpoint": str(final),
        "checkpoints": [str(p) for _, p in checkpoints.find_checkpoints(ckpt_root)],
        "best_validation": ctl.best,
        "validation_history": ctl.history,
        "test": {"before": before, "after": after},
        "final_model": str(out / "final_model"),
        "tensorboard": str(out / "tensorboard"),
        "resumed_from": str(resume_from) if resume_from else None,
        "attempt": attempt,
        "restarts": ctl.restarts,
        "ranks": [{"rank": r, **(w or {})} for r, w in sorted(ctl.ranks.items())],
        "trainable_parameters": plan.trainable,
        "total_parameters": plan.total,
        "elapsed_s": round(time.time() - started_at, 1),
        "config": to_dict(cfg),
    }
    _write_json(out / "run_summary.json", summary)
    changes = "  ".join(f"{k} {before[k]:.4g} -> {after[k]:.4g}" for k, v in after.items()
                        if isinstance(v, float) and k not in ("tokens", "examples", "perplexity"))
    _say(f"test (step {final_step}): {changes}; results in {out}")
    return summary
