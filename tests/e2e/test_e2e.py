"""End to end on a real local Ray instance with 2 CPU workers: sft-launch as a user runs it, on the
shared runs of conftest.py."""
import json
from pathlib import Path

import pytest

from tests.e2e.common import launch, scalars, texts
from tests.helpers import run_cli, tiny_config, tiny_llama, write_config

pytestmark = pytest.mark.e2e


def test_test_metrics_show_fine_tuning_helped(zero2):
    out, _, proc = zero2
    metrics = json.loads((out / "test_metrics.json").read_text())
    for phase in ("before", "after"):
        assert {"loss", "perplexity", "token_accuracy"} <= metrics[phase].keys()
        assert metrics[phase]["examples"] == 35  # the whole test split, each example once
    assert metrics["after"]["loss"] < metrics["before"]["loss"] - 0.2
    assert "test (step 12): loss" in proc.stdout and proc.stdout.count("[sft] eval  step") == 3


def test_console_is_quiet_by_default(zero2):
    _, _, proc = zero2
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert all(line.startswith("[sft] ") for line in lines), [l for l in lines if not l.startswith("[sft] ")][:5]
    assert "RayTrainWorker" not in proc.stdout + proc.stderr and "pid=" not in proc.stdout + proc.stderr
    assert [line.split()[2] for line in lines if line.startswith("[sft] step ")] == ["4/12", "8/12", "12/12"]
    assert proc.stderr.strip() == ""
    # The test phase opens after the last evaluation's line (its line travels faster than the report).
    opening = next(i for i, line in enumerate(lines) if line.startswith("[sft] test evaluation on the final"))
    assert opening > max(i for i, line in enumerate(lines) if line.startswith("[sft] eval  step 12:"))


def test_run_summary_records_the_run(zero2):
    out, _, _ = zero2
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["global_step"] == 12 and summary["world_size"] == 2
    assert summary["config"]["deepspeed"]["zero_stage"] == 2
    assert [r["rank"] for r in summary["ranks"]] == [0, 1] and all(r["node_id"] for r in summary["ranks"])
    assert summary["best_validation"]["step"] == 12
    assert [h["step"] for h in summary["validation_history"]] == [4, 8, 12]


def test_each_rank_wrote_its_shard_and_retention_kept_last_two(zero2):
    out, _, _ = zero2
    kept = sorted(p.name for p in (out / "checkpoints").rglob("step_*"))
    assert kept == ["step_0000008", "step_0000012"]  # keep_last 2; the best (12) is among them
    final = next((out / "checkpoints").rglob("step_0000012"))
    shards = sorted(p.name for p in (final / "ds").iterdir())
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in shards
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in shards
    assert (final / "rng_rank0.pt").is_file() and (final / "rng_rank1.pt").is_file()
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["step"] == 12 and state["micro_step"] == 12 and state["world_size"] == 2


def _final_model_test_loss(out: Path, config: Path) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.config_load import load_config
    from trainer.data import load_splits
    from trainer.evaluation import Shard
    from trainer.tasks import causal_lm

    cfg = load_config(config)
    model = AutoModelForCausalLM.from_pretrained(out / "final_model").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "final_model")
    prepared = causal_lm.prepare(load_splits(cfg)[2], cfg, tokenizer, [])
    shard = Shard(lambda b: model(**b).logits, causal_lm.collator(tokenizer), 0, 1, 8, "cpu")
    return causal_lm.evaluate(shard, prepared, [])[0]["loss"]


def test_final_model_loads_with_plain_transformers_and_gives_the_same_test_loss(zero2):
    out, config, _ = zero2
    assert (out / "final_model" / "model.safetensors").is_file()
    after = json.loads((out / "test_metrics.json").read_text())["after"]["loss"]
    assert _final_model_test_loss(out, config) == pytest.approx(after, rel=1e-5)


def test_tensorboard_has_train_val_and_test_scalars_by_step(zero2):
    out, _, _ = zero2
    tb = out / "tensorboard"
    assert sorted(scalars(tb, "train/loss")) == list(range(1, 13))
    for tag in ("train/lr", "train/grad_norm", "train/tokens_per_s"):
        assert len(scalars(tb, tag)) == 12, tag
    assert sorted(scalars(tb, "val/loss")) == [4, 8, 12]
    assert list(scalars(tb, "test/loss")) == [12]
    after = json.loads((out / "test_metrics.json").read_text())["after"]["loss"]
    assert scalars(tb, "test/loss")[12] == pytest.approx(after, rel=1e-5)


def _mlflow_history(server, out: Path, tag: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    run_id = json.loads((out / "tracking.json").read_text())["mlflow"]["run_id"]
    return sorted((m.step, m.value) for m in MlflowClient(server.uri).get_metric_history(run_id, tag))


def test_mlflow_and_wandb_hold_what_tensorboard_holds(zero2, mlflow_server):
    """One writer, every metric once at its step, the same values in each tracker; the config as
    parameters, the run's facts as tags, its files as artifacts."""
    from mlflow.tracking import MlflowClient

    from tests.helpers import wandb_history

    out, config, _ = zero2
    tb = out / "tensorboard"
    for tag in ("train/loss", "train/lr", "train/grad_norm", "val/loss", "val/token_accuracy", "test/loss",
                "test_before/loss"):
        logged = _mlflow_history(mlflow_server, out, tag)
        assert [s for s, _ in logged] == sorted(scalars(tb, tag)), tag  # each step once, the same steps
        assert [v for _, v in logged] == pytest.approx([scalars(tb, tag)[s] for s, _ in logged], rel=1e-6), tag
    identity = json.loads((out / "tracking.json").read_text())
    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(identity["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["optim.lr"] == "0.003" and run.data.params["deepspeed.zero_stage"] == "2"
    assert run.data.tags["sft.world_size"] == "2" and int(run.data.tags["sft.trainable_parameters"]) > 0
    assert {"test_metrics.json", "run_summary.json", "resolved_config.yaml"} <= {
        a.path for a in client.list_artifacts(run.info.run_id)}
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["tracking"]["lost"] == {} and summary["tracking"]["runs"]["mlflow"]["run_id"] == run.info.run_id
    run_id = identity["wandb"]["run_id"]
    (run_file,) = (out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    logged = wandb_history(run_file, "train/loss")
    assert sorted(logged) == list(range(1, 13))
    assert [logged[s] for s in sorted(logged)] == pytest.approx([scalars(tb, "train/loss")[s] for s in sorted(logged)],
                                                                rel=1e-6)


def test_resumed_run_starts_at_the_checkpoint_step_and_repeats_the_losses(zero2, resumed):
    out, _, _ = zero2
    target, stopped, proc = resumed
    assert "resumed from" in proc.stdout and "at step 1" in proc.stdout
    # The first launch prepared the data; the resumed one's driver and workers (training, then the
    # test evaluation) read it from the cache.
    assert "data: prepared" in stopped[0] and "data: prepared" not in proc.stdout
    assert proc.stdout.count("data: cached") == 3
    assert "training steps 2..12" in proc.stdout
    summary = json.loads((target / "run_summary.json").read_text())
    assert summary["global_step"] == 12 and summary["resumed_from"].endswith("step_0000001")
    assert summary["attempt"] == "attempt-2"
    new, old = scalars(target / "tensorboard", "train/loss"), scalars(out / "tensorboard", "train/loss")
    assert sorted(new) == list(range(1, 13))  # step 1 from the stopped launch, 2..12 from the resumed one
    assert [new[s] for s in new] == pytest.approx([old[s] for s in new], abs=1e-6)
    a = json.loads((target / "test_metrics.json").read_text())["after"]["loss"]
    b = json.loads((out / "test_metrics.json").read_text())["after"]["loss"]
    assert a == pytest.approx(b, abs=1e-6)


def test_a_stopped_and_resumed_run_is_one_tracker_run_with_each_step_once(resumed, mlflow_server):
    """The stopped launch sent step 1 (its checkpoint completed); the resumed one continues the same
    MLflow run from step 2: nothing twice, nothing missing."""
    target, stopped, _ = resumed
    logged = _mlflow_history(mlflow_server, target, "train/loss")
    assert [s for s, _ in logged] == list(range(1, 13))
    assert [v for _, v in logged] == pytest.approx([scalars(target / "tensorboard", "train/loss")[s]
                                                    for s, _ in logged], rel=1e-6)
    assert stopped[2]["tracking"]["runs"]["mlflow"]["run_id"] == json.loads(
        (target / "run_summary.json").read_text())["tracking"]["runs"]["mlflow"]["run_id"]


def test_zero3_shards_per_rank_and_consolidated_export(zero3, tokenizer_dir):
    out, proc = zero3
    final = next((out / "checkpoints").rglob("step_0000010"))
    shards = {p.name for p in (final / "ds").iterdir()}
    assert {"zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt",
            "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= shards
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert metrics["after"]["loss"] < metrics["before"]["loss"]
    assert "blocks [.TT]" in proc.stdout  # the freezing plan, printed before any worker started
    # The training mix's plan line; the workers tested (and exported) the checkpoint the controller kept as best.
    assert "training mix: shouted.jsonl 80 rows, weight 1: 24.9% of each epoch's draws" in proc.stdout
    assert "test and export: the best checkpoint by validation (test.checkpoint: best)" in proc.stdout
    summary = json.loads((out / "run_summary.json").read_text())
    assert metrics["checkpoint_choice"] == "best" and metrics["step"] == summary["best_validation"]["step"]
    assert metrics["checkpoint"] == summary["best_validation"]["checkpoint"]
    assert _final_model_test_loss(out, out.parent / "tiny3.yaml") == pytest.approx(metrics["after"]["loss"], rel=1e-5)


def test_zero3_answers_prompts_at_every_evaluation_and_every_test_prompt(zero3):
    """ZeRO-3 on 2 workers: every rank joins generate (synced), each example is answered once."""
    from trainer.generation import text_metrics

    out, proc = zero3
    assert ("[sft] generation: 3 validation prompts at each evaluation and every test prompt before and after "
            "fine-tuning; up to 8 new tokens, greedy") in proc.stdout  # the plan printed before launch
    tables = texts(out / "tensorboard", "val/generations")
    assert sorted(tables) == [5, 10]
    for step, table in tables.items():
        rows = [json.loads(line) for line in (out / "generations" / f"step_{step:07d}.jsonl").read_text().splitlines()]
        assert len(rows) == 3 and all(set(r) == {"id", "prompt", "reference", "answer"} for r in rows)
        lines = table.splitlines()
        assert lines[0] == "| id | prompt | reference | answer |" and len(lines) == 2 + 3
        assert [line.split(" | ")[0] for line in lines[2:]] == [f"| {r['id']}" for r in rows]
    metrics = json.loads((out / "test_metrics.json").read_text())
    rows = [json.loads(line) for line in (out / "test_generations.jsonl").read_text().splitlines()]
    assert len(rows) == metrics["after"]["examples"] == 35 and len({r["id"] for r in rows}) == 35
    assert all(set(r) == {"id", "prompt", "reference", "before", "after"} for r in rows)
    for phase in ("before", "after"):
        again = text_metrics([{"reference": r["reference"], "answer": r[phase]} for r in rows])
        assert metrics[phase]["exact_match"] == again["exact_match"]
        assert metrics[phase]["rougeL_f1"] == pytest.approx(again["rougeL_f1"])
    assert list(scalars(out / "tensorboard", "test/rougeL_f1")) == [10]


def test_output_dir_of_a_finished_run_is_not_overwritten(zero2):
    out, config, _ = zero2
    before = (out / "run_summary.json").read_text()
    proc = run_cli(config)
    assert proc.returncode == 2
    assert "already holds a run; pass --resume" in proc.stderr
    assert (out / "run_summary.json").read_text() == before


def _copy_final_checkpoint(zero2, tmp_path):
    import shutil

    out, config, _ = zero2
    source = next((out / "checkpoints").rglob("step_0000012"))
    return Path(shutil.copytree(source, tmp_path / "ckpt")), config


@pytest.mark.parametrize("change, message", [
    ({"model": {"architecture": tiny_llama(2)}}, "the checkpoint is of model 'architecture:"),
    ({"deepspeed": {"zero_stage": 3}}, "written with deepspeed.zero_stage 2, the config asks for 3"),
    ({"finetune": {"mode": "local", "train_last_layers": 1}}, "select other trainable parameters"),
    ({"corrupt": True}, "corrupted checkpoint file(s): "),
])
def test_resume_refuses_an_incompatible_or_corrupted_checkpoint(zero2, tmp_path, tokenizer_dir, change, message):
    import yaml

    ckpt, config = _copy_final_checkpoint(zero2, tmp_path)
    raw = yaml.safe_load(config.read_text())
    if change.pop("corrupt", False):
        shard = ckpt / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        shard.write_bytes(shard.read_bytes()[:1000])  # a truncated write
    for section, values in change.items():
        raw[section] = {**raw[section], **values}
    raw["output_dir"] = str(tmp_path / "new")
    proc = run_cli(write_config(tmp_path / "c.yaml", raw), "--resume", str(ckpt))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_truncated_latest_checkpoint_names_the_previous_complete_one(zero2, tmp_path):
    import shutil

    out, config, _ = zero2
    target = tmp_path / "copy"
    shutil.copytree(out / "checkpoints", target / "checkpoints")
    steps = sorted(target.rglob("step_*"))
    assert len(steps) >= 2, steps
    shard = steps[-1] / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:1000])  # the latest checkpoint's write was cut short
    proc = run_cli(config, "--output", str(target), "--resume")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"resume from the previous complete checkpoint with --resume {steps[-2]}" in proc.stderr, proc.stderr


def test_bad_row_found_by_the_workers_fails_once_with_exit_2(tmp_path, tokenizer_dir):
    rows = [json.loads(line) for line in (Path(__file__).parents[2] / "data" / "sft_tiny.jsonl").read_text().splitlines()]
    rows[240]["response"] = ""  # past the 200 rows preflight prepares
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = tiny_config(tmp_path, tokenizer_dir, data={"train_file": str(tmp_path / "d.jsonl"), "validation_file": str(data),
                                                     "test_file": str(data)})
    proc = launch(write_config(tmp_path / "c.yaml", raw))
    assert proc.returncode == 2
    assert "d.jsonl, train split, line 241, column 'response': is empty" in proc.stderr  # the file's line
    assert "worker failure" not in proc.stdout  # bad input is not retried
