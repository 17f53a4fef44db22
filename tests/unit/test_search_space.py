"""The search space (launcher/search_space.py), without Ray: its distributions, the values a search
can give, a trial's config, and check_space's refusals before any trial starts."""
import pytest

from launcher.search_space import check_space, checked_values, distribution, trial_config
from trainer.config import ConfigError
from trainer.config_load import from_dict

BASE = {"model": {"name_or_path": "gpt2"}, "data": {"train_file": "x.jsonl"}, "output_dir": "runs/search",
        "tune": {"space": {"optim.lr": {"loguniform": [1.0e-5, 1.0e-3]}}}}


def searching(space: dict, **tune) -> object:
    return from_dict({**BASE, "tune": {"space": space, **tune}})


def test_a_trial_is_the_base_with_its_values_and_no_search():
    cfg = from_dict(BASE)
    trial = trial_config(cfg, {"optim.lr": 3e-4, "train.micro_batch_size": 8}, "runs/search/trials/t0")
    assert trial.optim.lr == 3e-4 and trial.train.micro_batch_size == 8 and trial.tune is None
    assert trial.output_dir == "runs/search/trials/t0" and trial.model == cfg.model
    with pytest.raises(ConfigError, match="tune.space.optim.beta: no such config key"):
        trial_config(cfg, {"optim.beta": 0.9})
    with pytest.raises(ConfigError, match=r"tune trial: train.micro_batch_size must be >= 1, got 0"):
        trial_config(cfg, {"train.micro_batch_size": 0})


def test_a_distribution_is_one_kind_with_its_arguments():
    assert distribution("optim.lr", {"loguniform": [1e-5, 1e-3]}) == ("loguniform", [1e-5, 1e-3])
    assert distribution("optim.scheduler", {"grid": ("linear", "cosine")}) == ("grid", ["linear", "cosine"])
    with pytest.raises(ConfigError, match=r"tune.space.optim.lr must be one distribution, one of \{uniform"):
        distribution("optim.lr", {"normal": [0.1, 1]})
    with pytest.raises(ConfigError, match=r"tune.space.optim.lr: loguniform takes \[low, high\] \(low > 0\) with low < high"):
        distribution("optim.lr", {"loguniform": [1e-3, 1e-5]})
    with pytest.raises(ConfigError, match=r"tune.space.optim.lr: loguniform needs low > 0"):
        distribution("optim.lr", {"loguniform": [0, 1e-3]})
    with pytest.raises(ConfigError, match=r"tune.space.train.micro_batch_size: randint takes two integers"):
        distribution("train.micro_batch_size", {"randint": [1, 8.5]})
    with pytest.raises(ConfigError, match=r"tune.space.seed: choice takes a list \[value, \.\.\.\], got \[\]"):
        distribution("seed", {"choice": []})


def test_the_checked_values_are_every_choice_and_both_ends_of_a_range():
    assert checked_values("choice", ["a", "b"]) == ["a", "b"]
    assert checked_values("randint", [1, 8]) == [1, 7]  # high is excluded
    assert checked_values("uniform", [1, 8]) == [1.0, 8.0]  # a sample is a float


def test_check_space_refuses_what_a_trial_would_refuse():
    check_space(searching({"optim.lr": {"loguniform": [1e-5, 1e-3]}, "train.micro_batch_size": {"choice": [2, 4]}}))
    with pytest.raises(ConfigError, match=r"^tune.space.optim.lrr: no such config key"):
        check_space(searching({"optim.lrr": {"loguniform": [1e-5, 1e-3]}}))
    with pytest.raises(ConfigError, match=r"^tune.space.train.micro_batch_size: the search could give it 1.0, which the "
                                          r"config refuses: train.micro_batch_size must be an integer"):
        check_space(searching({"train.micro_batch_size": {"uniform": [1, 8]}}))
    with pytest.raises(ConfigError, match=r"^tune.space.optim.scheduler: the search could give it 'sawtooth', which the "
                                          r"config refuses: optim.scheduler must be one of"):
        check_space(searching({"optim.scheduler": {"grid": ["linear", "sawtooth"]}}))
    with pytest.raises(ConfigError, match=r"^tune.space.scaling.nodes: tune, output_dir, scaling, slurm are the search's own"):
        check_space(searching({"scaling.nodes": {"choice": [1, 2]}}))
    with pytest.raises(ConfigError, match=r"^tune.space.optim.lr: grid values do not go with tune.search_alg: optuna"):
        check_space(searching({"optim.lr": {"grid": [1e-4, 1e-3]}}, search_alg="optuna"))


def test_the_config_alone_checks_only_the_tune_sections_shape():
    """A bad space is the search's to refuse (sft-launch --tune): a plain run of the config ignores it."""
    assert searching({"optim.lrr": {"normal": [0.1, 1]}}).tune.space == {"optim.lrr": {"normal": [0.1, 1]}}
    with pytest.raises(ConfigError, match=r"tune.scheduler must be one of 'asha', 'fifo', got 'hyperband'"):
        searching({}, scheduler="hyperband")
    with pytest.raises(ConfigError, match=r"tune.space must be a mapping"):
        from_dict({**BASE, "tune": {"space": ["optim.lr"]}})
