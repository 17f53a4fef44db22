"""model.task: preference on tiny real models: the concatenated forward's log-probabilities, the
reference pass (once, reused), training that learns the preferred answers, LoRA's adapters-off
reference, resume. Two ZeRO-3 ranks giving one worker's reference and metrics:
tests/ranks/test_preference_ranks.py."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import DATA, tiny_config, tiny_llama
from trainer.config_load import from_dict
from trainer.loop import WorkerArgs, fine_tune
from trainer.report import ListReporter

EVASIVE = ["I am not sure about that.", "Sorry, I cannot help with this question.", "Please ask someone else."]


def pairs_file(tmp: Path, n: int = 200) -> str:
    """Pairs where `chosen` is the wanted answer and `rejected` an evasive non-answer."""
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[:n]]
    path = tmp / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["response"],
                                        "rejected": EVASIVE[i % len(EVASIVE)]}) + "\n" for i, r in enumerate(rows)))
    return str(path)


def preference_config(tmp: Path, tokenizer_dir, **sections) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    return tiny_config(tmp, tokenizer_dir, model={"architecture": tiny_llama(2), "tokenizer": str(tokenizer_dir),
                                                  "task": "preference"},
                       data={"train_file": pairs_file(tmp), "max_length": 96}, **sections)


def test_the_concatenated_batch_gives_each_examples_own_log_probabilities(tokenizer_dir):
    """Chosen and rejected of several pairs of different lengths in one right-padded batch: each
    row's completion log-probability equals a plain transformers forward of that example alone, to
    1e-5 in float64 (what the masking and concatenation must get exactly) and to fp32's own noise in
    fp32 (a sum of ~150 nats: about 1e-5 apart from batch-shape-dependent kernels alone)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from trainer.data import Split
    from trainer.tasks import preference

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = from_dict({"model": {"architecture": tiny_llama(2), "tokenizer": str(tokenizer_dir), "task": "preference"},
                     "data": {"train_file": "x.jsonl"}})
    rows = [{"prompt": "What is 12 plus 30?", "chosen": "Answer: 42.", "rejected": "Sorry, I cannot help with this."},
            {"prompt": "Hi", "chosen": "Hello, how can I help you today?", "rejected": "Go."},
            {"prompt": "Give the opposite of the word 'hot'.", "chosen": "cold", "rejected": "warm, or maybe hot"}]
    prepared = preference.prepare(Split.from_records("validation", "x.jsonl", rows), cfg, tokenizer, [])
    arch = dict(tiny_llama(2))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch.pop("model_type"), **arch)).eval()
    examples = prepared.examples(range(3))
    for dtype, tolerance in ((torch.float64, dict(abs=1e-5)), (torch.float32, dict(rel=1e-6))):
        _check_one_at_a_time(model.to(dtype), tokenizer, examples, tolerance)
    widths = {len(e["prompt_ids"]) + len(e[f"{s}_ids"]) for e in examples for s in ("chosen", "rejected")}
    assert len(widths) > 1  # padding was there to be masked


def _check_one_at_a_time(model, tokenizer, examples, tolerance) -> None:
    from trainer.tasks import preference

    with torch.no_grad():
        sums, lengths = preference._forward(model, preference.collator(tokenizer)(examples))
        for k, (e, side) in enumerate([(e, s) for s in ("chosen", "rejected") for e in examples]):
            prompt, completion = list(e["prompt_ids"]), list(e[f"{side}_ids"])
            logits = model(input_ids=torch.tensor([prompt + completion])).logits[0]
            logps = logits.log_softmax(-1)[len(prompt) - 1:-1].gather(1, torch.tensor(completion)[:, None])
            assert lengths[k].item() == len(completion)
            assert sums[k].item() == pytest.approx(logps.sum().item(), **tolerance)


def test_training_learns_the_chosen_answers_with_the_reference_computed_once(tmp_path, tokenizer_dir, process_group):
    """Before training the policy is the reference: rewards 0, accuracy 0, loss log 2. After 16 DPO
    steps the test pairs prefer the wanted answer (rewards/accuracies >= 0.9). A second run on the
    same data and weights reuses the stored reference; the export is a causal LM."""
    from transformers import AutoModelForCausalLM

    raw = preference_config(tmp_path, tokenizer_dir, optim={"lr": 3e-3, "warmup_steps": 0, "scheduler": "constant"},
                            train={"max_steps": 16, "micro_batch_size": 8, "eval_every": 8, "save_every": 16},
                            preference={"beta": 0.5},
                            eval={"generate": {"num_examples": 0, "test": True, "max_new_tokens": 4}})
    cfg, reporter = from_dict(raw), ListReporter(tmp_path / "ckpt")
    args = WorkerArgs(cache_dir=str(tmp_path / "cache"), checkpoint_root=str(tmp_path / "ckpt"),
                      export_dir=str(tmp_path / "final"), test_generations_path=str(tmp_path / "gen.jsonl"))
    fine_tune(cfg, reporter, args)
    test = reporter.calls[-1][0]
    assert test.before["rewards/accuracies"] == 0 and test.before["rewards/margins"] == 0
    assert test.before["loss"] == pytest.approx(np.log(2))
    assert test.after["rewards/accuracies"] >= 0.9, test.after
    assert test.after["rewards/margins"] > 0 and test.after["loss"] < np.log(2)
    validation = [m.validation for m, _ in reporter.calls[:-1]]
    assert set(validation[-1]) == {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                                   "rewards/margins", "logps/chosen", "logps/rejected"}
    answers = [json.loads(line) for line in (tmp_path / "gen.jsonl").read_text().splitlines()]
    assert len(answers) == test.before["examples"] and {"before", "after", "reference"} <= set(answers[0])
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path / "final"), torch.nn.Module)
    stored = list((tmp_path / "cache" / "preference-reference").glob("reference-*"))
    assert len(stored) == 1
    assert sum(1 for line in reporter.lines if line.startswith("reference: computed")) == 1
    assert sum(1 for line in reporter.lines if line.startswith("reference: cached")) == 1  # the test phase

    again = ListReporter(tmp_path / "ckpt2")
    fine_tune(cfg, again, WorkerArgs(cache_dir=str(tmp_path / "cache"), checkpoint_root=str(tmp_path / "ckpt2"),
                                     test_after=False))
    assert not [line for line in again.lines if line.startswith("reference: computed")]
    assert [m.validation for m, _ in again.calls] == validation  # the same reference, the same run


def test_lora_with_adapters_off_as_the_reference_needs_no_reference_pass(tmp_path, tokenizer_dir, process_group):
    """finetune.mode: lora with preference.reference: adapters_off, under ZeRO-3: the base with the
    adapters disabled is the reference (rewards start at exactly 0: fresh adapters change nothing),
    training moves the rewards apart, and no reference is computed or stored."""
    raw = preference_config(tmp_path, tokenizer_dir, finetune={"mode": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
                            deepspeed={"zero_stage": 3},
                            optim={"lr": 1e-2, "warmup_steps": 0, "scheduler": "constant"},
                            train={"max_steps": 6, "micro_batch_size": 8, "eval_every": 6, "save_every": 6},
                            preference={"beta": 0.5, "reference": "adapters_off"})
    reporter = ListReporter(tmp_path / "ckpt")
    fine_tune(from_dict(raw), reporter, WorkerArgs(cache_dir=str(tmp_path / "cache"),
                                                   checkpoint_root=str(tmp_path / "ckpt")))
    test = reporter.calls[-1][0]
    assert test.before["rewards/chosen"] == 0 and test.before["rewards/accuracies"] == 0
    assert test.after["rewards/margins"] > 0 and test.after["loss"] < np.log(2)
    assert not (tmp_path / "cache" / "preference-reference").exists()
    assert not [line for line in reporter.lines if line.startswith("reference:")]


@pytest.mark.parametrize("stage", [0, 1])
def test_resume_continues_with_identical_losses(tmp_path, tokenizer_dir, process_group, stage):
    """A run resumed from its step-2 checkpoint logs what the uninterrupted run logged after it (the
    reference columns travel with the data position)."""
    from trainer.loop import run

    raw = preference_config(tmp_path, tokenizer_dir, deepspeed={"zero_stage": stage},
                            train={"max_steps": 4, "micro_batch_size": 4, "eval_every": 2, "save_every": 2})
    cfg, args = from_dict(raw), WorkerArgs(cache_dir=str(tmp_path / "cache"))
    full = ListReporter(tmp_path / "full")
    run(cfg, full, args)
    resumed = ListReporter(tmp_path / "resumed")
    run(cfg, resumed, WorkerArgs(cache_dir=str(tmp_path / "cache"), resume_from=str(full.calls[0][1])))
    tail = lambda r: [(m.step, round(m.train_loss, 6), {k: round(v, 6) for k, v in m.validation.items()})  # noqa: E731
                      for m, _ in r.calls]
    assert tail(resumed) == tail(full)[1:] and tail(full)[1][0] == 4
