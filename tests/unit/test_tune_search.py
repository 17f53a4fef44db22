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
