"""trainer/chunked_loss.py against torch's cross-entropy on hand-made tensors (#26)."""
import math

import pytest
import torch
import torch.nn.functional as F

from trainer.chunked_loss import (AUTO_THRESHOLD_BYTES, LossImpl, chunk_count, chunk_tokens, chunked_loss, chunked_sums,
                                  head_only_logits, liger_refusal, logits_bytes, resolve_loss_impl)
from trainer.masking import IGNORE


def reference(hidden, labels, weight, bias=None):
    """What transformers' causal-LM loss computes: full logits, shifted inside, mean over labels."""
    logits = F.linear(hidden, weight, bias)
    return F.cross_entropy(logits[:, :-1].reshape(-1, weight.size(0)), labels[:, 1:].reshape(-1), ignore_index=IGNORE)


def tensors(seed=0, batch=3, length=11, width=8, vocab=37):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, width, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, width, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[0, :5] = IGNORE  # a prompt
    labels[1, :] = IGNORE  # a row with nothing labelled
    labels[2, -3:] = IGNORE  # padding
    return hidden, weight, labels


def grads(loss_fn, hidden, weight, bias=None):
    leaves = [t.clone().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    value = loss_fn(*leaves)
    value.backward()
    return value.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("chunk", [1, 3, 5, 40])  # chunks: 40 is more than the labelled positions
@pytest.mark.parametrize("with_bias", [False, True])
def test_loss_and_gradients_equal_the_full_cross_entropy(chunk, with_bias):
    hidden, weight, labels = tensors()
    bias = torch.randn(weight.size(0), dtype=torch.float64) if with_bias else None
    want, want_grads = grads(lambda h, w, *b: reference(h, labels, w, *b), hidden, weight, bias)
    got, got_grads = grads(lambda h, w, *b: chunked_loss(h, labels, lambda x: F.linear(x, w, *b), chunk),
                           hidden, weight, bias)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_tied_head_gets_both_gradients():
    """The head's weight is the input embedding: its gradient sums the embedding's and the head's."""
    hidden, weight, labels = tensors(seed=1)
    ids = torch.randint(0, weight.size(0), hidden.shape[:2])

    def through(loss_of):
        def fn(h, w):
            return loss_of(h + F.embedding(ids, w), w)
        return fn

    want, want_grads = grads(through(lambda h, w: reference(h, labels, w)), hidden, weight)
    got, got_grads = grads(through(lambda h, w: chunked_loss(h, labels, lambda x: F.linear(x, w), 4)), hidden, weight)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_nothing_labelled_is_nan_as_in_torch_and_an_unlabelled_row_adds_nothing():
    hidden, weight, labels = tensors()
    none = torch.full_like(labels, IGNORE)
    assert math.isnan(float(chunked_loss(hidden, none, lambda x: F.linear(x, weight), 4)))
    assert math.isnan(float(reference(hidden, none, weight)))
    # row 1 is unlabelled: the loss of the other rows alone is the same mean
    keep = [0, 2]
    torch.testing.assert_close(chunked_loss(hidden, labels, lambda x: F.linear(x, weight), 2),
                               reference(hidden[keep], labels[keep], weight))


def test_a_linear_head_gives_its_gradients_in_forward_called_once():
    """A plain Linear head: one call (as its own forward, so ZeRO-3's hooks gather the weight once per
    micro-batch on every rank), the gradients computed there slice by slice and not recomputed in
    backward; the same loss and gradients as the full logits."""
    hidden, weight, labels = tensors()
    head = torch.nn.Linear(weight.size(1), weight.size(0), bias=True, dtype=torch.float64)
    calls = []
    head.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    labelled = int((labels[:, 1:] != IGNORE).sum())
    x = hidden.clone().requires_grad_()
    loss = chunked_loss(x, labels, head, 4)
    loss.backward()
    assert calls == [labelled]  # only labelled positions, and nothing again in backward
    got = (x.grad, head.weight.grad, head.bias.grad)
    x.grad, head.weight.grad, head.bias.grad = None, None, None
    logits = head(x)[:, :-1]
    F.cross_entropy(logits.reshape(-1, weight.size(0)), labels[:, 1:].reshape(-1), ignore_index=IGNORE).backward()
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, weight.size(0)), labels[:, 1:].reshape(-1),
                                                     ignore_index=IGNORE))
    for a, b in zip(got, (x.grad, head.weight.grad, head.bias.grad)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("chunks", [4, 40])
def test_another_head_is_called_once_per_chunk_and_again_in_backward(chunks):
    """Any other head (peft wraps the head in modules of its own): exactly `chunks` calls whatever the
    batch holds (under ZeRO-3 each is an all-gather that every rank must make): 40 chunks for 13
    labelled positions leaves 27 empty ones, still called; each recomputed in backward."""
    hidden, weight, labels = tensors()
    linear = torch.nn.Linear(weight.size(1), weight.size(0), bias=False, dtype=torch.float64)
    head = torch.nn.Sequential(linear)
    calls = []
    head.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    labelled = int((labels[:, 1:] != IGNORE).sum())
    assert labelled == 13
    loss = chunked_loss(hidden.requires_grad_(), labels, head, chunks)
    assert len(calls) == chunks and sum(calls) == labelled  # only labelled positions get logits
    loss.backward()
    assert len(calls) == 2 * chunks and sum(calls) == 2 * labelled  # recomputed in backward, not kept
    assert linear.weight.grad is not None
    calls.clear()
    chunked_sums(hidden, labels, head, chunks)
    assert len(calls) == chunks


def test_sums_equal_the_full_logits_statistics():
    hidden, weight, labels = tensors(seed=2)
    logits = F.linear(hidden, weight)[:, :-1]
    target = labels[:, 1:]
    mask = target != IGNORE
    want = (float(F.cross_entropy(logits.reshape(-1, weight.size(0)), target.reshape(-1), ignore_index=IGNORE,
                                  reduction="sum")),
            float(mask.sum()), float(((logits.argmax(-1) == target) & mask).sum()))
    got = chunked_sums(hidden, labels, lambda x: F.linear(x, weight), 3)
    assert got[1:] == want[1:] and got[0] == pytest.approx(want[0], rel=1e-12)


def test_auto_picks_liger_on_cuda_else_chunked_above_the_threshold():
    big = dict(micro_batch_size=2, max_length=2048, vocab_size=49152)  # SmolLM2: 768 MiB of logits
    small = dict(micro_batch_size=2, max_length=256, vocab_size=32000)
    assert logits_bytes(**big) == 2 * 2048 * 49152 * 4 > AUTO_THRESHOLD_BYTES
    assert resolve_loss_impl("auto", False, False, zero_stage=2, **big) == "chunked"
    assert resolve_loss_impl("auto", False, False, zero_stage=2, **small) == "standard"
    assert resolve_loss_impl("auto", True, True, zero_stage=2, **small) == "liger"
    assert resolve_loss_impl("auto", True, True, zero_stage=3, **big) == "chunked"
    assert resolve_loss_impl("auto", True, False, zero_stage=2, **big) == "chunked"
    assert resolve_loss_impl("auto", False, False, zero_stage=2, supported=False, **big) == "standard"
    assert resolve_loss_impl("standard", True, True, zero_stage=2, **big) == "standard"


def test_chunk_size_and_logit_transforms_and_liger_refusal():
    assert chunk_tokens(49152) == 170 and chunk_tokens(10**9) == 16 and chunk_tokens(400, budget=400 * 4 * 50) == 50
    assert chunk_count(2, 2048, 49152) == 25 and chunk_count(1, 10, 400) == 1  # 4,096 positions by 170

    class Config:
        final_logit_softcapping = None

    assert head_only_logits(Config())
    Config.final_logit_softcapping = 30.0
    assert not head_only_logits(Config())
    assert liger_refusal(True, True) is None
    assert "no CUDA GPU" in liger_refusal(False, True) and "not installed" in liger_refusal(True, False)


def test_the_run_resolves_its_loss_from_the_config_and_the_model():
    from types import SimpleNamespace

    from trainer.chunked_loss import loss_implementation
    from trainer.config import ConfigError
    from trainer.config_load import from_dict

    def cfg(impl, task="causal_lm"):
        return from_dict({"model": {"name_or_path": "m", "task": task}, "data": {"train_file": "x.jsonl", "max_length": 2048},
                          "train": {"loss_impl": impl, "micro_batch_size": 2}}, "cfg.yaml")

    smollm = SimpleNamespace(vocab_size=49152)
    assert loss_implementation(cfg("auto"), smollm, False, False) == LossImpl("chunked", 25)
    assert loss_implementation(cfg("auto"), smollm, True, True) == LossImpl("liger", 25)  # its evaluation's chunks
    assert loss_implementation(cfg("auto", "sequence_classification"), smollm, False, False) == LossImpl("standard")
    capped = SimpleNamespace(vocab_size=49152, final_logit_softcapping=30.0)
    assert loss_implementation(cfg("auto"), capped, False, False) == LossImpl("standard")
    with pytest.raises(ConfigError, match=r"train.loss_impl: chunked .* transforms them \(final_logit_softcapping\)"):
        loss_implementation(cfg("chunked"), capped, False, False)
    with pytest.raises(ConfigError, match=r"train.loss_impl: liger .* CUDA GPUs only; the workers here have no CUDA"):
        loss_implementation(cfg("liger"), smollm, False, True)
