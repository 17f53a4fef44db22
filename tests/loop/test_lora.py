"""LoRA (finetune.mode: lora) through the worker loop in one process: adapters train, the base does
not, checkpoints hold adapters only, resume is exact, the merged export gives the tested loss. Two
ranks' LoRA checkpoint continuing on one: tests/ranks/test_lora_ranks.py."""
from pathlib import Path

import pytest
import torch

from tests.helpers import save_pretrained_llama, tiny_config
from trainer.checkpoints import TAG, read_state
from trainer.config_load import from_dict, to_dict
from trainer.loop import WorkerArgs, run, run_test
from trainer.report import ListReporter


def _cfg(tmp: Path, tokenizer_dir, stage: int, **sections):
    base = save_pretrained_llama(tmp / "pretrained", tokenizer_dir)
    return from_dict(tiny_config(tmp, tokenizer_dir, model={"name_or_path": str(base), "architecture": None,
                                                            "tokenizer": None},
                                 finetune={"mode": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
                                 optim={"lr": 1e-2}, deepspeed={"zero_stage": stage}, **sections))


def _run(cfg, tmp: Path, **args):
    reporter = ListReporter(tmp)
    run(cfg, reporter, WorkerArgs(cache_dir=str(tmp.parent / "cache"), **args))
    return reporter


def test_adapters_train_the_base_does_not_and_resume_is_exact(tmp_path, tokenizer_dir, process_group):
    cfg = _cfg(tmp_path, tokenizer_dir, stage=2)
    full = _run(cfg, tmp_path / "full")
    step4, final = full.calls[0][1], full.calls[-1][1]
    assert read_state(step4).lean
    saved = torch.load(final / TAG / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    # q/k/v/o and the MLP projections of all 3 blocks, A and B each; nothing of the base
    assert len(saved) == 3 * 7 * 2 and all(".lora_A." in n or ".lora_B." in n for n in saved)
    assert any(float(t.abs().sum()) > 0 for n, t in saved.items() if ".lora_B." in n)  # B starts at 0: it trained
    # the optimizer holds the adapters' fp32 copy and moments only: as many elements as they have
    optim = torch.load(final / TAG / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
    partition = sum(t.numel() for t in optim["optimizer_state_dict"]["single_partition_of_fp32_groups"])
    assert partition == sum(t.numel() for t in saved.values())
    assert full.calls[-1][0].validation["loss"] < full.calls[0][0].validation["loss"]
    resumed = ListReporter(tmp_path / "resumed")
    run(cfg, resumed, WorkerArgs(cache_dir=str(tmp_path / "cache"), resume_from=str(step4)))
    tail = lambda r: [(m.step, round(m.train_loss, 6), round(m.validation["loss"], 6)) for m, _ in r.calls]
    assert tail(resumed) == tail(full)[1:]


def test_zero3_lora_tests_and_exports_merged_and_adapter(tmp_path, tokenizer_dir, process_group):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer import data_cache
    from trainer.chat import TEMPLATES
    from trainer.evaluation import Shard
    from trainer.tasks import causal_lm

    # data.chat_template: the rows are rendered with it, and the exported tokenizer carries it.
    cfg = _cfg(tmp_path, tokenizer_dir, stage=3, export={"lora": "both"}, data={"chat_template": "llama3"},
               train={"max_steps": 6, "eval_every": 6, "save_every": 6})
    trained = _run(cfg, tmp_path / "ckpt")
    result = run_test(cfg, ListReporter(), WorkerArgs(cache_dir=str(tmp_path / "cache"),
                                                      final_checkpoint=str(trained.calls[-1][1]),
                                                      export_dir=str(tmp_path / "final_model")))
    assert result.after["loss"] < result.before["loss"]
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "final_model")
    assert tokenizer.chat_template == TEMPLATES["llama3"]
    test = data_cache.prepare(cfg, tokenizer, None).splits["test"]

    def test_loss(model) -> float:
        shard = Shard(lambda b: model(**b).logits, causal_lm.collator(tokenizer), 0, 1, 8, "cpu")
        return causal_lm.evaluate(shard, test, [])[0]["loss"]

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final_model").eval()  # plain transformers
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert test_loss(merged) == pytest.approx(result.after["loss"], rel=1e-5)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "pretrained")
    adapted = PeftModel.from_pretrained(base, tmp_path / "final_adapter").eval()
    assert test_loss(adapted) == pytest.approx(result.after["loss"], rel=1e-5)
    # export.lora: merged streams (each adapted weight merged as it is read, no model built): bit for
    # bit the merge_and_unload export above (export.lora: both builds the model for peft's adapter folder).
    merged_only = from_dict({**to_dict(cfg), "export": {"lora": "merged"}})
    _same_tensors(merged_only, trained.calls[-1][1], tmp_path / "final_model", tmp_path / "streamed", tokenizer)


def _same_tensors(cfg, checkpoint: Path, built: Path, streamed: Path, processor, labels=()) -> None:
    """The streamed merged export of `checkpoint` has exactly the tensors of the built one in `built`."""
    from safetensors.torch import load_file

    from trainer.export import export_model

    cache = str(streamed.parent / "cache")
    assert export_model(cfg, Path(checkpoint), streamed, processor, list(labels), cache) == "streamed"
    ours, theirs = load_file(streamed / "model.safetensors"), load_file(built / "model.safetensors")
    assert sorted(ours) == sorted(theirs) and not any("lora" in n for n in ours)
    assert all(torch.equal(ours[n], theirs[n]) for n in theirs), [n for n in theirs if not torch.equal(ours[n], theirs[n])]


def test_a_classification_head_trains_fully_beside_the_adapters(tmp_path, process_group):
    from tests.helpers import make_wordpiece_tokenizer, task_config

    wordpiece = make_wordpiece_tokenizer(tmp_path / "wp")
    raw = task_config(tmp_path, "sequence_classification", tokenizer=wordpiece, scaling={"workers_per_node": 1})
    cfg = from_dict({**raw, "finetune": {"mode": "lora", "lora": {"r": 4}}})
    reporter = _run(cfg, tmp_path / "ckpt")
    saved = torch.load(reporter.calls[-1][1] / TAG / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    first = torch.load(reporter.calls[0][1] / TAG / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    head = "base_model.model.classifier.modules_to_save.default.weight"
    changed = {n for n in saved if not torch.equal(saved[n], first[n])}
    assert head in changed and any("lora_B" in n for n in changed)  # the head trains fully beside the adapters
    assert all("lora_" in n or "modules_to_save" in n for n in changed)  # the base does not move
    assert "accuracy" in reporter.calls[-1][0].validation
    # The merged export streams the fully trained head from its modules_to_save copy: as the built one.
    from transformers import AutoTokenizer

    from trainer import data_cache
    from trainer.export import export_built

    tokenizer = AutoTokenizer.from_pretrained(wordpiece)
    labels = data_cache.prepare(cfg, tokenizer, None).labels
    export_built(cfg, reporter.calls[-1][1], tmp_path / "built", tokenizer, labels, str(tmp_path / "cache"))
    _same_tensors(cfg, reporter.calls[-1][1], tmp_path / "built", tmp_path / "streamed", tokenizer, labels)


@pytest.mark.parametrize("stage", [0, 1])
def test_lora_trains_and_checkpoints_adapters_only_on_zero_stages_0_and_1(tmp_path, tokenizer_dir, process_group,
                                                                          stage):
    cfg = _cfg(tmp_path, tokenizer_dir, stage=stage, train={"max_steps": 4, "eval_every": 2, "save_every": 4})
    reporter = _run(cfg, tmp_path / "ckpt")
    final = reporter.calls[-1][1]
    saved = torch.load(final / TAG / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert saved and all(".lora_A." in n or ".lora_B." in n for n in saved)
    assert reporter.calls[-1][0].validation["loss"] < reporter.calls[0][0].validation["loss"]
