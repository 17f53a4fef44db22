"""model.task: preference without a model: the objectives against their formulas on hand-made
log-probabilities, the preference: section's errors, and the pair data (formats, shared prompt
tokens, completion-only labels, truncation, bad rows named by file and line)."""
import math

import pytest
import torch

from trainer.config import ConfigError
from trainer.config_load import from_dict
from trainer.data import Split
from trainer.masking import IGNORE
from trainer.preference_loss import Pairs, dpo, ipo, metric_sums, metrics_from_sums, objective, orpo, simpo
from trainer.tasks import preference

T = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
logsig = lambda x: -math.log1p(math.exp(-x))  # noqa: E731  log sigmoid(x)

# Two pairs: summed completion log-probabilities of the policy and the reference, token counts.
C, R, RC, RR, NC, NR = T(-4.0, -10.0), T(-6.0, -9.0), T(-5.0, -8.0), T(-5.5, -9.5), T(4, 5), T(2, 3)


def test_dpo_is_the_sigmoid_of_the_scaled_log_ratio_difference_with_label_smoothing():
    beta, eps = 0.5, 0.1
    losses, chosen, rejected = dpo(C, R, RC, RR, beta, eps)
    for i in range(2):
        z = beta * ((C[i] - RC[i]) - (R[i] - RR[i])).item()
        assert losses[i].item() == pytest.approx(-(1 - eps) * logsig(z) - eps * logsig(-z), rel=1e-12)
        assert chosen[i].item() == pytest.approx(beta * (C[i] - RC[i]).item())
        assert rejected[i].item() == pytest.approx(beta * (R[i] - RR[i]).item())
    # the policy is the reference: log 2 and no preference either way
    same, c, r = dpo(C, R, C, R, beta)
    assert same.tolist() == pytest.approx([math.log(2)] * 2) and c.tolist() == r.tolist() == [0.0, 0.0]


def test_ipo_is_the_squared_distance_of_the_averaged_log_ratios_from_one_over_two_beta():
    beta = 0.2
    losses, chosen, _ = ipo(C, R, RC, RR, NC, NR, beta)
    for i in range(2):
        h = (C[i] - RC[i]).item() / NC[i].item() - (R[i] - RR[i]).item() / NR[i].item()
        assert losses[i].item() == pytest.approx((h - 1 / (2 * beta)) ** 2, rel=1e-12)
    assert chosen.tolist() == pytest.approx((beta * (C - RC)).tolist())


def test_simpo_is_reference_free_length_normalised_with_a_margin():
    beta, gamma = 2.0, 0.5
    losses, chosen, rejected = simpo(C, R, NC, NR, beta, gamma)
    for i in range(2):
        z = beta * (C[i] / NC[i] - R[i] / NR[i]).item() - gamma
        assert losses[i].item() == pytest.approx(-logsig(z), rel=1e-12)
        assert chosen[i].item() == pytest.approx(beta * (C[i] / NC[i]).item())
        assert rejected[i].item() == pytest.approx(beta * (R[i] / NR[i]).item())


def test_orpo_is_the_chosen_nll_minus_beta_log_sigmoid_of_the_log_odds_ratio():
    beta = 0.1
    losses, _, _ = orpo(C, R, NC, NR, beta)
    for i in range(2):
        c, r = (C[i] / NC[i]).item(), (R[i] / NR[i]).item()
        odds = lambda x: x - math.log(1 - math.exp(x))  # noqa: E731  log(p / (1 - p)), p = exp(x)
        assert losses[i].item() == pytest.approx(-c - beta * logsig(odds(c) - odds(r)), rel=1e-9)


def test_objective_dispatches_on_preference_loss_and_metrics_average_each_pair_once():
    cfg = from_dict({"model": {"name_or_path": "x", "task": "preference"}, "data": {"train_file": "d.jsonl"},
                     "preference": {"loss": "dpo", "beta": 0.5}})
    p = Pairs(C, R, NC, NR, RC, RR)
    losses, chosen, rejected = objective(p, cfg.preference)
    assert losses.tolist() == dpo(C, R, RC, RR, 0.5)[0].tolist()
    # two ranks' halves summed give what one rank computes over both pairs
    halves = [metric_sums(*(t[i:i + 1] for t in (losses, chosen, rejected)), Pairs(C[i:i + 1], R[i:i + 1], NC, NR))
              for i in range(2)]
    whole = metrics_from_sums([a + b for a, b in zip(*halves)])
    margins = (chosen - rejected).tolist()
    assert whole["rewards/margins"] == pytest.approx(sum(margins) / 2)
    assert whole["rewards/accuracies"] == sum(m > 0 for m in margins) / 2
    assert whole["loss"] == pytest.approx(losses.mean().item()) and whole["examples"] == 2
    assert whole["logps/chosen"] == pytest.approx(-7.0) and whole["logps/rejected"] == pytest.approx(-7.5)


# ---------------------------------------------------------------- config

def raw(**preference):
    out = {"model": {"name_or_path": "x", "task": "preference"}, "data": {"train_file": "d.jsonl"}}
    if preference:
        out["preference"] = preference
    return out


@pytest.mark.parametrize("section, message", [
    ({"bta": 0.1}, r"cfg.yaml: unknown key 'preference.bta'. Did you mean 'preference.beta'\?"),
    ({"beta": 0}, r"cfg.yaml: preference.beta must be > 0, got 0"),
    ({"loss": "kto"}, r"cfg.yaml: preference.loss must be one of 'dpo', 'ipo', 'simpo', 'orpo', got 'kto'"),
    ({"label_smoothing": 0.6}, r"preference.label_smoothing must be in \[0, 0.5\), got 0.6"),
    ({"loss": "ipo", "label_smoothing": 0.1}, r"label_smoothing applies to the dpo and simpo losses, not 'ipo'"),
    ({"reference": "adapters_off"}, r"preference.reference: adapters_off needs finetune.mode: lora"),
])
def test_preference_section_errors_name_the_key(section, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(raw(**section), "cfg.yaml")


def test_the_preference_section_belongs_to_the_preference_task_and_reference_free_losses_skip_the_pass():
    other = {**raw(beta=0.2), "model": {"name_or_path": "x", "task": "causal_lm"}}
    with pytest.raises(ConfigError, match=r"the preference section is set, but model.task is 'causal_lm'; "
                                          r"use model.task: preference"):
        from_dict(other, "cfg.yaml")
    assert preference.needs_reference(from_dict(raw(loss="dpo")))
    assert not preference.needs_reference(from_dict(raw(loss="simpo")))
    lora = {**raw(reference="adapters_off"), "finetune": {"mode": "lora"}}
    assert not preference.needs_reference(from_dict(lora))  # the LoRA model gives it, no pass
    assert from_dict(raw(loss="orpo", reference="adapters_off")).preference.needs_reference is False


# ---------------------------------------------------------------- data

@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def cfg(**data):
    return from_dict({"model": {"name_or_path": "x", "task": "preference"},
                      "data": {"train_file": "d.jsonl", **data}})


def prepared(records, tokenizer, name="validation", **data):
    return preference.prepare(Split.from_records(name, "d.jsonl", records), cfg(**data), tokenizer, [])


def test_the_three_formats_give_the_same_tokens(tokenizer):
    standard = {"prompt": "What is 2 plus 2?", "chosen": "Answer: 4.", "rejected": "Answer: 5."}
    conversational = {"prompt": [{"role": "user", "content": "What is 2 plus 2?"}],
                      "chosen": [{"role": "assistant", "content": "Answer: 4."}],
                      "rejected": [{"role": "assistant", "content": "Answer: 5."}]}
    sharegpt = {"conversations": [{"from": "human", "value": "What is 2 plus 2?"}],
                "chosen": {"from": "gpt", "value": "Answer: 4."}, "rejected": {"from": "gpt", "value": "Answer: 5."}}
    seen = [prepared([row], tokenizer).examples([0])[0] for row in (standard, conversational, sharegpt)]
    assert seen[0] == seen[1] == seen[2]
    prompt = tokenizer.decode(seen[0]["prompt_ids"])
    assert prompt == "<|im_start|>user\nWhat is 2 plus 2?<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(seen[0]["chosen_ids"]) == "Answer: 4.<|im_end|>\n"
    assert tokenizer.decode(seen[0]["rejected_ids"]) == "Answer: 5.<|im_end|>\n"
    assert prepared([standard], tokenizer).column(preference.REFERENCE, [0]) == ["Answer: 4."]


def test_sharegpt_rows_keep_their_system_turn_and_several_prompt_turns(tokenizer):
    row = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                             {"from": "gpt", "value": "Hello."}, {"from": "human", "value": "2+2?"}],
           "chosen": [{"from": "gpt", "value": "4"}], "rejected": {"from": "gpt", "value": "5"}}
    e = prepared([row], tokenizer).examples([0])[0]
    assert tokenizer.decode(e["prompt_ids"]) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                                                 "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                                                 "<|im_start|>assistant\n")


def test_the_collator_shares_the_prompt_and_labels_only_completion_tokens(tokenizer):
    rows = [{"prompt": "What is 2 plus 2?", "chosen": "Answer: 4.", "rejected": "Answer: 5, I think."},
            {"prompt": "Hi", "chosen": "Hello there.", "rejected": "Go away."}]
    p = prepared(rows, tokenizer)
    examples = p.examples([0, 1])
    batch = preference.collator(tokenizer)(examples)
    assert batch["input_ids"].shape[0] == 4  # chosen rows, then rejected rows
    for k, (e, side) in enumerate([(e, s) for s in ("chosen", "rejected") for e in examples]):
        n_prompt, n_completion = len(e["prompt_ids"]), len(e[f"{side}_ids"])
        ids, labels, mask = batch["input_ids"][k], batch["labels"][k], batch["attention_mask"][k]
        assert ids[:n_prompt].tolist() == list(e["prompt_ids"])
        assert labels[:n_prompt].tolist() == [IGNORE] * n_prompt
        assert labels[n_prompt:n_prompt + n_completion].tolist() == list(e[f"{side}_ids"])
        assert (labels[n_prompt + n_completion:] == IGNORE).all() and mask.sum() == n_prompt + n_completion
    assert preference.count(examples) == int(batch["attention_mask"].sum())


def test_truncation_keeps_the_prompts_end_and_every_completion_whole():
    assert preference.truncate([1, 2, 3, 4, 5], [6, 7], [8], 6) == [2, 3, 4, 5]
    assert preference.truncate([1, 2], [6, 7], [8], 6) == [1, 2]
    assert preference.truncate([1, 2], [6, 7, 8, 9, 10, 11], [8], 6) is None  # no prompt token would be left


def test_rows_whose_completion_fills_max_length_are_dropped_and_counted(tokenizer):
    rows = [{"prompt": "Hi " * 30, "chosen": "Hello.", "rejected": "Go."},
            {"prompt": "Hi", "chosen": "word " * 40, "rejected": "Go."}]
    p = prepared(rows, tokenizer, max_length=24)
    assert len(p) == 1 and p.dropped == {"completions longer than data.max_length - 1 = 23 tokens": 1}
    e = p.examples([0])[0]
    assert len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) == 24
    assert tokenizer.decode(e["prompt_ids"]).endswith("<|im_start|>assistant\n")  # the prompt's end is kept


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Hi", "chosen": "Hello."}, r"d.jsonl, validation split, line 2, column 'rejected': is missing"),
    ({"prompt": "Hi", "chosen": "Hello.", "rejected": " Hello. "},
     r"line 2, column 'rejected': is the same as 'chosen': the pair prefers nothing"),
    ({"prompt": "Hi", "chosen": "  ", "rejected": "No."}, r"line 2, column 'chosen': is empty"),
    ({"prompt": "Hi", "chosen": [{"role": "user", "content": "x"}], "rejected": [{"role": "assistant", "content": "No."}]},
     r"line 2, column 'chosen': must be an assistant turn, got the role 'user'"),
])
def test_bad_rows_are_named_by_file_and_line(tokenizer, row, message):
    good = {"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."}
    if isinstance(row["chosen"], list):  # a file holds one kind: turns throughout
        good = {k: v if k == "prompt" else [{"role": "assistant", "content": v}] for k, v in good.items()}
    rows = [good, {"rejected": None, **row}]
    with pytest.raises(ConfigError, match=message):
        prepared(rows, tokenizer)
    assert len(prepared(rows, tokenizer, skip_bad_rows=True)) == 1


def test_a_file_without_the_pair_columns_is_refused_naming_them(tokenizer):
    with pytest.raises(ConfigError, match=r"d.jsonl: the validation split has no column 'rejected'; preference data "
                                          r"needs 'chosen' and 'rejected'"):
        prepared([{"prompt": "Hi", "chosen": "Hello."}], tokenizer)


def test_a_search_over_preference_beta_is_checked_before_any_trial():
    from launcher.search_space import check_space, trial_config

    space = {"preference.beta": {"loguniform": [0.05, 0.5]}}
    cfg = from_dict({**raw(), "tune": {"space": space, "metric": "rewards/accuracies", "mode": "max"}})
    check_space(cfg)
    assert trial_config(cfg, {"preference.beta": 0.2}).preference.beta == 0.2
    bad = from_dict({**raw(), "tune": {"space": {"preference.beta": {"uniform": [0.0, 0.5]}}}})
    with pytest.raises(ConfigError, match=r"tune.space.preference.beta: the search could give it 0.0, which the "
                                          r"config refuses: preference.beta must be > 0"):
        check_space(bad)
    with pytest.raises(ConfigError, match=r"tune.metric is 'accuracy', but model.task 'preference' reports loss, "
                                          r"rewards/chosen"):
        from_dict({**raw(), "tune": {"space": space, "metric": "accuracy"}})


def test_the_reference_is_keyed_by_the_weights_bytes_not_their_path(tmp_path):
    """An SFT run exporting into the same folder changes the weights: the key changes; the same
    weights elsewhere keep it. Precision and the prepared data's key change it too."""
    from trainer.reference import reference_key, weights_digest

    cfg = from_dict(raw())
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"weights-1")
        (folder / "config.json").write_text("{}")
    assert weights_digest(cfg, str(a)) == weights_digest(cfg, str(b))
    before = weights_digest(cfg, str(a))
    (a / "model.safetensors").write_bytes(b"weights-2")  # exported over
    assert weights_digest(cfg, str(a)) != before
    keys = {reference_key(cfg, before, "fp32", "data1"), reference_key(cfg, before, "bf16", "data1"),
            reference_key(cfg, before, "fp32", "data2")}
    assert len(keys) == 3
    inline = from_dict({**raw(), "model": {"architecture": {"model_type": "gpt2"}, "tokenizer": "t", "task": "preference"}})
    other_seed = from_dict({**raw(), "model": {"architecture": {"model_type": "gpt2"}, "tokenizer": "t",
                                               "task": "preference"}, "seed": 1})
    assert weights_digest(inline, None) != weights_digest(other_seed, None)  # the seed makes the weights


def test_trls_own_losses_on_the_same_log_probabilities_equal_ours(monkeypatch):
    """TRL (test-only dependency) keeps DPO's loss inside DPOTrainer._compute_loss (private, needs a
    model's outputs), but its CPO and ORPO trainers' public loss methods take log-probabilities:
    CPO's sigmoid / ipo / simpo are DPO (reference 0), IPO (per-token averages, reference 0) and
    SimPO; ORPO's odds-ratio term is ours. Called on a stand-in trainer holding only the settings
    they read."""
    from types import SimpleNamespace

    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    def trl(loss_type, chosen, rejected, beta, eps=0.0, gamma=0.5):
        settings = SimpleNamespace(alpha=0.0, loss_type=loss_type, beta=beta, label_smoothing=eps, simpo_gamma=gamma,
                                   accelerator=SimpleNamespace(device="cpu"))
        return CPOTrainer.cpo_loss(settings, chosen, rejected)

    zero = T(0.0, 0.0)
    ours, theirs = dpo(C, R, zero, zero, 0.5, 0.1), trl("sigmoid", C, R, 0.5, 0.1)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b.double(), atol=1e-12)
    ours, theirs = ipo(C, R, zero, zero, NC, NR, 0.2), trl("ipo", C / NC, R / NR, 0.2)
    assert torch.allclose(ours[0], theirs[0].double(), atol=1e-12)
    ours, theirs = simpo(C, R, NC, NR, 2.0, 0.5, 0.1), trl("simpo", C / NC, R / NR, 2.0, 0.1, 0.5)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b.double(), atol=1e-12)
    odds, chosen_rewards, _, _, _ = ORPOTrainer.odds_ratio_loss(
        SimpleNamespace(beta=0.1, accelerator=SimpleNamespace(device="cpu")), C / NC, R / NR)
    ours = orpo(C, R, NC, NR, 0.1)
    # TRL returns beta * log sigma(log odds ratio) and subtracts it from the chosen NLL outside
    assert torch.allclose(ours[0], (-(C / NC) - odds.double()), atol=1e-6)
    assert torch.allclose(ours[1], chosen_rewards.double(), atol=1e-6)
