"""Config loading: typed sections, clear errors naming the dotted key, overrides typed like YAML."""
from pathlib import Path

import pytest

from trainer.config import ConfigError, RunConfig
from trainer.config_checks import generate_examples, generates_test
from trainer.config_load import from_dict, load_config, to_dict

REPO = Path(__file__).resolve().parents[2]
BASE = {"model": {"name_or_path": "gpt2"}, "data": {"train_file": "x.jsonl"}}


def build(**sections):
    return from_dict({**BASE, **sections}, "cfg.yaml")


def test_defaults_fill_every_section():
    cfg = build()
    assert cfg.deepspeed.zero_stage == 2 and cfg.deepspeed.precision == "auto"
    assert cfg.finetune.mode == "global" and cfg.train.save_interval == cfg.train.eval_every
    assert cfg.scaling.world_size == 2


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"cfg.yaml: unknown key 'optim.lrr'. Did you mean 'optim.lr'\?"):
        build(optim={"lrr": 1e-4})


def test_unknown_top_level_key_lists_known_ones_when_nothing_is_close():
    with pytest.raises(ConfigError, match=r"unknown key 'zzz'. Known keys: model, data, finetune"):
        build(zzz=1)


def test_wrong_type_names_key_expected_and_found():
    with pytest.raises(ConfigError, match=r"train.micro_batch_size must be an integer, got 'four' \(str\)"):
        build(train={"micro_batch_size": "four"})


def test_range_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"optim.lr must be > 0, got 0.0"):
        build(optim={"lr": 0})
    with pytest.raises(ConfigError, match=r"deepspeed.zero_stage must be 0, 1, 2 or 3, got 5"):
        build(deepspeed={"zero_stage": 5})
    with pytest.raises(ConfigError, match=r"deepspeed.precision must be one of 'auto', 'fp32', 'bf16', 'fp16'"):
        build(deepspeed={"precision": "fp8"})


def test_yaml_scientific_notation_without_dot_is_a_number():
    assert build(optim={"lr": "3e-5"}).optim.lr == 3e-5


def test_model_needs_exactly_one_source():
    with pytest.raises(ConfigError, match="exactly one of model.name_or_path"):
        from_dict({"model": {}, "data": {"train_file": "x"}})
    with pytest.raises(ConfigError, match="model.tokenizer is required with model.architecture"):
        from_dict({"model": {"architecture": {"model_type": "gpt2"}}, "data": {"train_file": "x"}})


def test_local_mode_needs_a_rule_and_global_mode_refuses_rules():
    with pytest.raises(ConfigError, match="finetune.mode is 'local' but no rule is given"):
        build(finetune={"mode": "local"})
    with pytest.raises(ConfigError, match="finetune.mode is 'global'.*finetune.train_last_layers is set"):
        build(finetune={"train_last_layers": 2})


def test_fractions_must_sum_to_one():
    with pytest.raises(ConfigError, match=r"data.fractions must be three positive numbers"):
        build(data={"train_file": "x", "fractions": [0.5, 0.1, 0.1]})


def test_generation_defaults_come_from_the_task():
    cfg = build()  # causal_lm
    assert cfg.eval.generate.num_examples is None and generate_examples(cfg) == 8 and generates_test(cfg)
    off = build(eval={"generate": {"num_examples": 0, "test": False}})
    assert generate_examples(off) == 0 and not generates_test(off)
    classifier = {"name_or_path": "bert", "task": "sequence_classification"}
    cls = build(model=classifier)
    assert generate_examples(cls) == 0 and not generates_test(cls)
    assert generate_examples(build(model=classifier, eval={"generate": {"num_examples": 0}})) == 0
    with pytest.raises(ConfigError, match=r"eval.generate.num_examples is 4, but model.task 'sequence_classification' "
                                          r"does not generate text \(only causal_lm does\)"):
        build(model=classifier, eval={"generate": {"num_examples": 4}})
    with pytest.raises(ConfigError, match=r"eval.generate.test is true, but model.task 'sequence_classification'"):
        build(model=classifier, eval={"generate": {"test": True}})
    with pytest.raises(ConfigError, match=r"eval.generate.max_new_tokens must be >= 1, got 0"):
        build(eval={"generate": {"max_new_tokens": 0}})
    with pytest.raises(ConfigError, match=r"eval.generate.zero3 must be one of auto, gathered, synced, got 'fast'"):
        build(eval={"generate": {"zero3": "fast"}})


def test_yaml_syntax_error_names_the_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  name_or_path: gpt2\ndata: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: YAML syntax error at line \d+"):
        load_config(p)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_are_typed_like_yaml_and_checked(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {name_or_path: gpt2}\ndata: {train_file: x.jsonl}\n")
    cfg = load_config(p, ["optim.lr=3e-5", "deepspeed.zero_stage=3", "finetune.mode=local",
                          "finetune.train=[h.1.*]"])
    assert cfg.optim.lr == 3e-5 and cfg.deepspeed.zero_stage == 3 and cfg.finetune.train == ("h.1.*",)
    with pytest.raises(ConfigError, match="unknown key 'train.max_step'. Did you mean 'train.max_steps'"):
        load_config(p, ["train.max_step=3"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(p, ["optim.lr"])


def test_relative_data_paths_resolve_against_the_config_file(tmp_path):
    (tmp_path / "d.jsonl").write_text("{}\n")
    p = tmp_path / "c.yaml"
    p.write_text("model: {name_or_path: gpt2}\ndata: {train_file: d.jsonl}\n")
    assert load_config(p).data.train_file == str((tmp_path / "d.jsonl").resolve())


def test_loading_a_config_builds_exactly_one(monkeypatch):
    """No trial config per searched value, no rebuild to resolve paths: load_config constructs one
    RunConfig (dataclasses.replace would construct another, and is counted too)."""
    built, check = [], RunConfig.__post_init__

    def counted(self):
        built.append(self)
        check(self)

    monkeypatch.setattr(RunConfig, "__post_init__", counted)
    cfg = load_config(REPO / "configs" / "gpt_ft.yaml", ["tune.space={optim.lr: {loguniform: [1.0e-5, 1.0e-3]}, "
                                                         "train.micro_batch_size: {choice: [1, 2, 4]}}"])
    assert cfg.tune is not None and len(cfg.tune.space) == 2
    assert len(built) == 1 and built[0] is cfg


def test_round_trip_through_plain_dict():
    cfg = build(finetune={"mode": "local", "train": ["a.*"], "train_last_layers": 1})
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.data.train_file is None or Path(cfg.data.train_file).is_file()


def test_early_stopping_is_off_by_default_and_checked_against_the_tasks_metrics():
    assert build().train.early_stopping is None and build().test.checkpoint == "final"
    cfg = build(train={"early_stopping": {"metric": "token_accuracy", "mode": "max"}}, test={"checkpoint": "best"})
    assert cfg.train.early_stopping.patience == 3 and cfg.test.checkpoint == "best"
    assert build(train={"early_stopping": {}}).train.early_stopping.metric == "loss"
    assert from_dict(to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match=r"train.early_stopping.metric is 'accuracy', but model.task 'causal_lm' "
                                          r"reports loss, perplexity, token_accuracy"):
        build(train={"early_stopping": {"metric": "accuracy"}})
    with pytest.raises(ConfigError, match=r"train.early_stopping.patience must be >= 1, got 0"):
        build(train={"early_stopping": {"patience": 0}})
    with pytest.raises(ConfigError, match=r"test.checkpoint must be one of 'final', 'best', got 'last'"):
        build(test={"checkpoint": "last"})


def test_train_file_takes_a_path_a_list_of_paths_or_weighted_sources():
    from trainer.config import Source

    assert build().data.sources == (Source("x.jsonl", 1.0),) and build().data.train_file == "x.jsonl"
    listed = build(data={"train_file": ["a.jsonl", "b.jsonl"]})
    assert listed.data.sources == (Source("a.jsonl"), Source("b.jsonl"))
    weighted = build(data={"train_file": [{"path": "a.jsonl", "weight": 3}, "b.jsonl"]})
    assert weighted.data.sources == (Source("a.jsonl", 3.0), Source("b.jsonl", 1.0))
    assert from_dict(to_dict(weighted)) == weighted
    with pytest.raises(ConfigError, match=r"cfg.yaml: data.train_file\[1\]: weight must be > 0, got -1.0"):
        build(data={"train_file": ["a.jsonl", {"path": "b.jsonl", "weight": -1}]})
    with pytest.raises(ConfigError, match=r"unknown key 'data.train_file\[0\].wieght'. Did you mean "
                                          r"'data.train_file\[0\].weight'\?"):
        build(data={"train_file": [{"path": "a.jsonl", "wieght": 3}]})
    with pytest.raises(ConfigError, match=r"data.train_file\[1\] must be a path or a mapping \{path, weight\}, got 5"):
        build(data={"train_file": ["a.jsonl", 5]})
    with pytest.raises(ConfigError, match=r"data.train_file is an empty list"):
        build(data={"train_file": []})


def test_relative_source_paths_resolve_against_the_config_file(tmp_path):
    (tmp_path / "a.jsonl").write_text("{}\n")
    p = tmp_path / "c.yaml"
    p.write_text("model: {name_or_path: gpt2}\ndata: {train_file: [{path: a.jsonl, weight: 2}, b.jsonl]}\n")
    assert [(s.path, s.weight) for s in load_config(p).data.sources] == [(str((tmp_path / "a.jsonl").resolve()), 2.0),
                                                                         ("b.jsonl", 1.0)]


def test_loss_impl_defaults_to_auto_and_is_refused_where_it_cannot_apply():
    assert build().train.loss_impl == "auto" and build(train={"loss_impl": "chunked"}).train.loss_impl == "chunked"
    with pytest.raises(ConfigError, match=r"train.loss_impl must be one of 'auto', 'standard', 'chunked', 'liger'"):
        build(train={"loss_impl": "fused"})
    classify = {"name_or_path": "bert-base-uncased", "task": "sequence_classification"}
    with pytest.raises(ConfigError, match=r"train.loss_impl is 'chunked', but model.task 'sequence_classification' "
                                          r"computes its loss from its own head"):
        build(model=classify, train={"loss_impl": "chunked"})
    assert build(model=classify, train={"loss_impl": "standard"}).train.loss_impl == "standard"
    with pytest.raises(ConfigError, match=r"train.loss_impl: liger .* not verified under deepspeed.zero_stage 3"):
        build(train={"loss_impl": "liger"}, deepspeed={"zero_stage": 3})
