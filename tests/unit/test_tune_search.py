"""A search's trial configs, without Ray: paths a trial in another process can read, trials at once
(the searched values on top of the base: tests/unit/test_search_space.py)."""
from launcher.tune import absolute_paths, concurrency
from trainer.config_load import from_dict
from tests.helpers import REPO

BASE = {"model": {"name_or_path": "gpt2"}, "output_dir": "runs/search",
        "tune": {"space": {"optim.lr": {"loguniform": [1.0e-5, 1.0e-3]}}}}


def test_every_path_a_trial_reads_is_absolute_a_training_mix_too(monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = from_dict({**BASE, "data": {"train_file": ["data/sft_tiny.jsonl", {"path": "data/topics.jsonl", "weight": 2}],
                                      "cache_dir": "cache"}})
    fixed = absolute_paths(cfg)
    assert [s.path for s in fixed.data.train_file] == [str(REPO / "data/sft_tiny.jsonl"), str(REPO / "data/topics.jsonl")]
    assert fixed.data.cache_dir == str(REPO / "cache") and fixed.output_dir == str(REPO / "runs/search")


def test_trials_at_once_is_what_the_cluster_holds():
    cfg = from_dict({**BASE, "data": {"train_file": "x.jsonl"}, "scaling": {"workers_per_node": 2, "cpus_per_worker": 2}})
    assert concurrency(cfg, {"CPU": 16.0}, 0.0) == 4
    assert concurrency(cfg, {"CPU": 16.0, "GPU": 2.0}, 1.0) == 1
    assert concurrency(cfg, {"CPU": 2.0}, 0.0) == 1  # one trial at least (check_resources says if it cannot fit)


def test_every_trial_of_an_elastic_search_gets_the_worker_range_and_runs_on_the_head_node():
    """A trial is a plain run of its config through the same worker-group code (controller.run_group ->
    ray_job.fit): its config keeps the base's elastic scaling (scaling.* is not searchable), so its group
    gets Ray's worker range, placed by resources alone. Its function (and with it the trial's Ray Train
    controller and queue) asks for the head node, so losing another node resizes the trial's group
    instead of ending the trial."""
    import ast

    from launcher.ray_job import scaling_options
    from launcher.search_space import trial_config
    from launcher.tune import HEAD_NODE, trial_resources

    base = from_dict({**BASE, "data": {"train_file": "x.jsonl"},
                      "scaling": {"nodes": 2, "workers_per_node": 2, "min_nodes": 1, "resize_check_s": 5}})
    trial = trial_config(base, {"optim.lr": 1e-4}, "runs/search/trials/t1")
    options = scaling_options(trial, ["node-a", "node-b"], 0.0)
    assert options["num_workers"] == (2, 4) and options["elastic_resize_monitor_interval_s"] == 5.0
    assert options["placement_strategy"] == "SPREAD" and "label_selector" not in options
    plain = from_dict({**BASE, "data": {"train_file": "x.jsonl"}, "scaling": {"nodes": 2, "workers_per_node": 2}})
    fixed = scaling_options(trial_config(plain, {}), ["a", "b"], 0.0)
    assert fixed["num_workers"] == 4 and [s["ray.io/node-id"] for s in fixed["label_selector"]] == ["a", "a", "b", "b"]
    assert trial_resources()[HEAD_NODE] > 0 and trial_resources()["CPU"] == 0
    # The search builds no worker group of its own: launcher/tune.py names no Ray Train class.
    tree = ast.parse((REPO / "launcher" / "tune.py").read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | \
        {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    trainers = names & {"TorchTrainer", "ScalingConfig", "DataParallelTrainer"}
    assert not trainers, trainers
