"""Rendering the Slurm batch script: a pure function of the config."""
from pathlib import Path

from trainer.config_load import from_dict
from launcher.slurm import TEMPLATE, render, sbatch_lines


def cfg(**sections):
    return from_dict({"model": {"name_or_path": "gpt2"}, "data": {"train_file": "x"}, "output_dir": "/shared/run",
                      **sections})


def test_sbatch_header_follows_scaling_and_slurm_keys():
    c = cfg(scaling={"nodes": 4, "workers_per_node": 2, "cpus_per_worker": 3, "gpus_per_worker": 1},
            slurm={"partition": "gpu", "account": "ml", "time": "08:00:00", "signal_grace_s": 300})
    lines = sbatch_lines(c, Path("configs/gpt_ft.yaml"), Path("/shared/run"))
    for expected in ("--nodes=4", "--ntasks-per-node=1", "--cpus-per-task=6", "--gpus-per-node=2",
                     "--partition=gpu", "--account=ml", "--time=08:00:00", "--requeue", "--signal=B:USR1@300",
                     "--job-name=sft-gpt_ft", "--output=/shared/run/slurm-%j.out"):
        assert f"#SBATCH {expected}" in lines


def test_rendered_script_runs_the_launcher_with_the_passed_overrides():
    text = render(cfg(), Path("/cfg/a b.yaml"), "/venv/bin/python", ["--set", "optim.lr=1e-4"], TEMPLATE.read_text())
    assert "@@" not in text
    assert "CONFIG='/cfg/a b.yaml'" in text and "ARGS=(--set optim.lr=1e-4)" in text
    assert "--gpus-per-node" not in text and "--num-gpus" not in text  # a CPU job asks for no GPUs
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text and "trap 'kill -USR1" in text


def test_a_search_runs_in_the_batch_job_and_a_requeued_job_continues_it(tmp_path):
    """`sft-launch CONFIG --tune --slurm`: the job runs the search; after a requeue, --resume continues it."""
    from launcher.cli import main

    config = tmp_path / "s.yaml"
    config.write_text(f"model: {{name_or_path: gpt2}}\ndata: {{train_file: x}}\noutput_dir: {tmp_path / 'run'}\n"
                      f"tune: {{space: {{optim.lr: {{loguniform: [1.0e-5, 1.0e-3]}}}}}}\n")
    assert main([str(config), "--tune", "--slurm"]) == 0
    text = (tmp_path / "run" / "sft.sbatch").read_text()
    assert "ARGS=(--tune)" in text
    assert '[ -d "$OUT/tune" ]' in text  # the requeued job passes --resume when a search was started


def test_an_elastic_run_asks_slurm_not_to_kill_the_job_when_a_node_fails():
    elastic = sbatch_lines(cfg(scaling={"nodes": 4, "min_nodes": 2}), Path("c.yaml"), Path("/shared/run"))
    assert "#SBATCH --no-kill" in elastic
    fixed = sbatch_lines(cfg(scaling={"nodes": 4}), Path("c.yaml"), Path("/shared/run"))
    assert "#SBATCH --no-kill" not in fixed
