"""Elastic continuation (scaling.min_nodes): the keys, and the global batch kept on every worker count
of the range (the accumulation recomputed, the step count and LR schedule unchanged)."""
import pytest

from trainer.config import ConfigError
from trainer.config_load import from_dict
from trainer.ds_config import deepspeed_config
from trainer.schedule import accumulation, check_elastic, counts_losing_the_global_batch, steps_of_run


def cfg(scaling, **train):
    return from_dict({"model": {"name_or_path": "gpt2"}, "data": {"train_file": "x"},
                      "train": {"micro_batch_size": 2, "gradient_accumulation": 1, **train}, "scaling": scaling},
                     "cfg.yaml")


def test_min_nodes_defaults_to_nodes_and_is_checked():
    plain = cfg({"nodes": 3, "workers_per_node": 2})
    assert plain.scaling.min_world_size == 6 and not plain.scaling.is_elastic
    elastic = cfg({"nodes": 3, "workers_per_node": 2, "min_nodes": 1, "resize_check_s": 5})
    assert elastic.scaling.min_world_size == 2 and elastic.scaling.is_elastic
    assert elastic.scaling.resize_check_s == 5.0
    with pytest.raises(ConfigError, match=r"cfg.yaml: scaling.min_nodes must be between 1 and scaling.nodes \(2\), got 3"):
        cfg({"nodes": 2, "min_nodes": 3})
    with pytest.raises(ConfigError, match=r"scaling.resize_check_s must be > 0, got 0"):
        cfg({"nodes": 2, "min_nodes": 1, "resize_check_s": 0})


def test_an_elastic_run_keeps_its_global_batch_on_every_size():
    c = cfg({"nodes": 2, "workers_per_node": 2, "min_nodes": 1}, gradient_accumulation=3)  # 12 micro-batches a step
    assert [accumulation(c.scaling, c.train, w) for w in (2, 3, 4)] == [6, 4, 3]
    for world in (2, 3, 4):
        ds = deepspeed_config(c, world, "fp32")
        assert ds["train_batch_size"] == 2 * 12 and ds["gradient_accumulation_steps"] * world == 12
    plain = cfg({"nodes": 2, "workers_per_node": 2}, gradient_accumulation=3)
    assert accumulation(plain.scaling, plain.train, 1) == 3  # a --resume on another size keeps the key's value


def test_the_step_count_is_that_of_the_starting_size():
    c = cfg({"nodes": 2, "workers_per_node": 1, "min_nodes": 1}, gradient_accumulation=1, epochs=1.0, max_steps=None)
    # 10 examples, micro batch 2: 5 micro-batches per epoch on 2 workers -> 3 steps, on 1 worker at the
    # recomputed accumulation of 2 also 3; counted at the starting size whatever the worker count.
    assert steps_of_run(c, 10, 1) == steps_of_run(c, 10, 2) == 3


def test_counts_that_cannot_keep_the_global_batch_are_refused_by_name():
    c = cfg({"nodes": 4, "workers_per_node": 1, "min_nodes": 2}, gradient_accumulation=1)  # 4 micro-batches a step
    assert counts_losing_the_global_batch(c.scaling, c.train) == [3]
    with pytest.raises(ConfigError) as err:
        check_elastic(c)
    text = str(err.value)
    assert "does not divide among 3 worker(s) (it does among 2, 4)" in text
    assert "train.gradient_accumulation that every count divides (for example 3)" in text
    check_elastic(cfg({"nodes": 4, "workers_per_node": 1, "min_nodes": 2}, gradient_accumulation=3))  # 12: 2, 3, 4
    check_elastic(cfg({"nodes": 4, "workers_per_node": 1}))  # not elastic: nothing to keep
    with pytest.raises(ConfigError, match="3 worker\\(s\\) cannot keep the global batch of 4 micro-batch"):
        accumulation(c.scaling, c.train, 3)


# ---- the driver's side: resizes and what a failure costs (launcher/resizes.py, the controller)

def where(node, pid):
    from trainer.messages import Where

    return Where(node, "127.0.0.1", "h", pid)


def test_group_log_records_a_shrink_and_a_growth_with_the_node_and_the_time_lost():
    from launcher.resizes import GroupLog, Resize

    log = GroupLog()
    assert log.started((where("A", 1), where("B", 2)), now=0.0) == "first"
    assert log.stepped(1, now=1.0) is None
    log.halted(now=10.0)  # the failure
    log.halted(now=11.0)  # Ray's decision to start the smaller group: the clock started already
    assert log.started((where("A", 3),), now=30.0) == "resize"
    assert log.stepped(5, now=40.5) == Resize(4, 2, 1, "B", 30.5)
    log.halted(now=100.0)  # a resize check found node C
    assert log.started((where("A", 4), where("C", 5)), now=110.0) == "resize"
    assert log.stepped(9, now=112.0) == Resize(8, 1, 2, "C", 12.0)
    log.halted(now=200.0)  # a worker process died; the group restarts on as many workers
    assert log.started((where("A", 6), where("C", 7)), now=210.0) == "same size"
    assert log.stepped(10, now=211.0) is None and len(log.resizes) == 2 and log.world_size == 2


def test_an_elastic_run_counts_only_failures_that_no_resize_absorbed(tmp_path):
    from launcher.controller import Controller, FailuresExhausted
    from tests.helpers import tiny_config
    from trainer.messages import GroupStarted, WorkerFailure

    raw = tiny_config(tmp_path, tmp_path, scaling={"nodes": 2, "workers_per_node": 1, "min_nodes": 1},
                      train={"max_steps": 20, "max_failures": 1})
    ctl = Controller(from_dict(raw), tmp_path)

    def failed(pid):
        return WorkerFailure({0: f"ActorDiedError: worker pid={pid} died"}, {0: "Traceback ..."})

    ctl.receive(GroupStarted((where("A", 1), where("B", 2))))
    ctl.receive(failed(2))
    ctl.receive(GroupStarted((where("A", 3),)))  # node B lost: a resize
    ctl.receive(failed(3))
    ctl.receive(GroupStarted((where("A", 4),)))  # same size: a restart, the first of max_failures = 1
    assert ctl.restarts == 1 and ctl.groups.world_size == 1
    ctl.receive(GroupStarted((where("A", 4), where("C", 5))))  # grown back: no failure, no restart
    ctl.receive(failed(5))
    with pytest.raises(FailuresExhausted, match="2 failures that a resize did not absorb"):
        ctl.receive(GroupStarted((where("A", 6), where("C", 7))))


def test_one_rank_without_the_shared_storage_ends_the_run_with_its_message(tmp_path):
    """A node that joined later and cannot see output_dir: its worker's BadInput comes through the queue
    alone, at once, and ends the run as bad input (exit 2)."""
    from launcher.controller import Controller
    from tests.helpers import tiny_config
    from trainer.messages import BadInput

    ctl = Controller(from_dict(tiny_config(tmp_path, tmp_path)), tmp_path)
    with pytest.raises(ConfigError, match="does not see output_dir"):
        ctl.receive(BadInput("node h does not see output_dir /x: it is not shared storage there"))


def test_an_elastic_run_still_ends_at_once_on_a_deterministic_failure(tmp_path):
    from launcher.controller import Controller, RepeatedFailure
    from tests.helpers import tiny_config
    from trainer.messages import GroupStarted, WorkerFailure

    raw = tiny_config(tmp_path, tmp_path, scaling={"nodes": 2, "workers_per_node": 1, "min_nodes": 1},
                      train={"max_steps": 20, "max_failures": 5})
    ctl = Controller(from_dict(raw), tmp_path)
    bad = WorkerFailure({0: "IndexError: index out of range in self"}, {0: "Traceback ..."})
    ctl.receive(GroupStarted((where("A", 1), where("B", 2))))
    ctl.receive(bad)
    ctl.receive(GroupStarted((where("A", 3), where("B", 4))))
    with pytest.raises(RepeatedFailure, match="the same error twice before the first step"):
        ctl.receive(bad)


def test_a_resumed_launch_carries_the_resizes_that_led_to_its_checkpoint(tmp_path):
    """The driver keeps the resizes so far beside each checkpoint it completes; a launch resumed from one
    starts with those (and no later ones), adds its own, and run_summary.json lists them all in order."""
    import json
    from types import SimpleNamespace

    from launcher.controller import open_run, summarise
    from launcher.resizes import HISTORY, read_history
    from tests.helpers import tiny_config
    from tests.unit.test_checkpoints import fake
    from trainer.messages import GroupStarted, GroupStarting, Received, StepMetrics, TrainReport, WorkerFailure

    cfg = from_dict(tiny_config(tmp_path, tmp_path, scaling={"nodes": 2, "workers_per_node": 1, "min_nodes": 1},
                                train={"max_steps": 20, "keep_last": 100}))
    out = tmp_path / "run"

    def checkpointed(ctl, attempt, step, world):
        path = fake(out / "checkpoints" / attempt, step, world=world, marked=False)
        ctl.receive(Received((TrainReport(step, 1.0),) * world, (where("A", 0),) * world, str(path)))
        return path

    paths, first = open_run(cfg, out, None)
    first.receive(GroupStarted((where("A", 1), where("B", 2))))
    first.receive(StepMetrics(1))
    at_2 = checkpointed(first, paths.attempt, 2, world=2)
    first.receive(WorkerFailure({1: "ActorDiedError: node B lost"}))
    first.receive(GroupStarted((where("A", 3),)))  # node B lost: 2 -> 1 from step 2
    first.receive(StepMetrics(3))
    at_4 = checkpointed(first, paths.attempt, 4, world=1)
    first.close()
    assert not (at_2 / HISTORY).exists()  # no resize had happened by then
    assert [(r.step, r.from_world_size, r.to_world_size, r.node) for r in read_history(at_4)] == [(2, 2, 1, "B")]

    # The launch that died after step 4 is resumed: it carries the resize and grows back on its own.
    paths, resumed = open_run(cfg, out, at_4)
    assert paths.attempt == "attempt-2" and resumed.groups.resizes == read_history(at_4)
    resumed.receive(GroupStarted((where("A", 5),)))  # its first group: not a resize
    resumed.receive(StepMetrics(5))
    resumed.receive(GroupStarting(2))  # the resize check found node C
    resumed.receive(GroupStarted((where("A", 6), where("C", 7))))
    resumed.receive(StepMetrics(6))
    at_6 = checkpointed(resumed, paths.attempt, 6, world=2)
    assert [(r.step, r.from_world_size, r.to_world_size, r.node) for r in read_history(at_6)] == \
        [(2, 2, 1, "B"), (5, 1, 2, "C")]
    summary = summarise(cfg, paths, resumed, SimpleNamespace(trainable=1, total=1), at_6, 1.0).summary
    resumed.close()
    assert summary["resizes"] == [r.as_json() for r in read_history(at_6)] and summary["world_size"] == 2
    assert json.loads((out / "run_summary.json").read_text())["resizes"] == summary["resizes"]

    # Resumed from step 2 instead: the resize after it is not on that run's way.
    _, earlier = open_run(cfg, out, at_2)
    earlier.close()
    assert earlier.groups.resizes == []


def test_a_resize_history_that_is_not_one_is_refused_naming_the_file(tmp_path):
    from launcher.controller import open_run
    from launcher.resizes import HISTORY
    from tests.helpers import tiny_config
    from tests.unit.test_checkpoints import fake

    cfg = from_dict(tiny_config(tmp_path, tmp_path, scaling={"nodes": 2, "workers_per_node": 1, "min_nodes": 1}))
    at_4 = fake(tmp_path / "run" / "checkpoints" / "attempt-1", 4)
    (at_4 / HISTORY).write_text('[{"step": 2}]')
    with pytest.raises(ConfigError, match=f"--resume {at_4}: {HISTORY} is not the list of resizes the run wrote"):
        open_run(cfg, tmp_path / "run", at_4)
