"""The causal-LM objective without the logits wall (#26): the LM head and the cross-entropy over
slices of the labelled positions, never the whole micro-batch x tokens x vocabulary logits at once.

Pure functions over tensors and a `head` (a callable hidden -> logits: the model's LM head module,
so ZeRO-3's module hooks gather its weight, tied to the input embedding or not). Training: when the
head is a plain Linear, each slice's logits give their gradients (of the hidden states, the weight
and the bias) in the forward pass itself, as liger-kernel's fused linear cross-entropy does, in plain
torch (`_SummedCrossEntropy`, run as the head's own forward so that ZeRO-3 gathers its weight for it
and again for its backward); backward recomputes nothing, and at most one slice's logits are alive
beside a gradient buffer the size of the weight. Any other head (peft's wrappers) recomputes each
slice in backward (torch.utils.checkpoint), calling the head once per slice. The number of chunks is
fixed per run (LossImpl.chunks, from micro_batch_size x data.max_length), not per batch: under ZeRO-3
each head call is an all-gather, so every rank must make the same number of them whatever its batch
holds (empty chunks still call the head). Position t predicts token t + 1 and the mean is over label
tokens != IGNORE, as transformers' ForCausalLMLoss without num_items_in_batch (the loop never passes
it). Also which implementation `train.loss_impl` resolves to, and how many bytes the logits take.
Imports torch inside functions only; never ray, deepspeed or transformers.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

from trainer.masking import IGNORE

# Logits of one chunk in fp32: the chunk holds this many bytes' worth of positions (at least 16).
CHUNK_BYTES = 32 * 2**20
# train.loss_impl: auto picks chunked when micro_batch x max_length x vocab x 4 bytes exceeds this.
AUTO_THRESHOLD_BYTES = 256 * 2**20
# What a standard step keeps per logit: the logits, the log-softmax, the gradient (fp32 each).
LOGIT_COPIES = 3


@dataclass(frozen=True)
class LossImpl:
    """train.loss_impl as a run resolved it: standard, chunked or liger; chunked (and liger's
    evaluation): into how many chunks every micro-batch's labelled positions are cut (the same on
    every rank)."""
    name: str
    chunks: int = 1


def chunk_tokens(vocab_size: int, budget: int | None = None) -> int:
    """Positions per chunk: `budget` (default CHUNK_BYTES) of fp32 logits, at least 16."""
    return max(16, (CHUNK_BYTES if budget is None else budget) // (4 * max(vocab_size, 1)))


def chunk_count(micro_batch_size: int, max_length: int, vocab_size: int) -> int:
    """Chunks per micro-batch: a full one (micro_batch_size x max_length labelled positions) in
    chunks of at most chunk_tokens(vocab_size) positions; a batch with fewer spreads them thinner."""
    return max(1, math.ceil(micro_batch_size * max_length / chunk_tokens(vocab_size)))


def logits_bytes(micro_batch_size: int, max_length: int, vocab_size: int) -> int:
    """Bytes of one micro-batch's fp32 logits at full length (the logits alone)."""
    return 4 * micro_batch_size * max_length * vocab_size


def resolve_loss_impl(asked: str, on_cuda: bool, has_liger: bool, micro_batch_size: int, max_length: int,
                      vocab_size: int, zero_stage: int, supported: bool = True) -> str:
    """What train.loss_impl means for this run: standard, chunked or liger. auto: liger on CUDA when
    liger-kernel is installed (not under ZeRO-3, where its weight use outside the head's forward is
    unverified), else chunked when the logits would exceed AUTO_THRESHOLD_BYTES, else standard;
    always standard for a model whose logits are not just the head of its last hidden states
    (`supported` False: soft-capped or scaled logits)."""
    if asked != "auto":
        return asked
    if not supported:
        return "standard"
    if on_cuda and has_liger and zero_stage != 3:
        return "liger"
    return "chunked" if logits_bytes(micro_batch_size, max_length, vocab_size) > AUTO_THRESHOLD_BYTES else "standard"


def shifted_targets(labels):
    """labels[:, 1:] with IGNORE appended to each row: the target of every position, flattened."""
    import torch.nn.functional as F

    return F.pad(labels[:, 1:], (0, 1), value=IGNORE).reshape(-1)


def _upcast(logits):
    """At least fp32 (bf16/fp16 logits upcast, as transformers' loss does; fp64 stays)."""
    import torch

    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _chunk_loss_sum(head: Callable[[Any], Any], hidden, target):
    import torch.nn.functional as F

    return F.cross_entropy(_upcast(head(hidden)), target, ignore_index=IGNORE, reduction="sum")


@functools.cache
def _summed_cross_entropy():
    """The autograd function (built on first use: this module imports torch inside functions only)."""
    import torch
    import torch.nn.functional as F

    class SummedCrossEntropy(torch.autograd.Function):
        """sum over rows i of CE(x_i W^T + b, y_i), a slice of rows at a time, every gradient computed
        in forward (softmax - one-hot of each slice, multiplied out at once) and only scaled in backward."""

        @staticmethod
        def forward(ctx, x, weight, bias, y, chunks):
            wide = torch.promote_types(weight.dtype, torch.float32)
            total = x.new_zeros((), dtype=wide)
            grad_x = torch.empty_like(x) if x.requires_grad else None
            grad_w = torch.zeros_like(weight, dtype=wide) if weight.requires_grad else None
            grad_b = torch.zeros_like(bias, dtype=wide) if bias is not None and bias.requires_grad else None
            for at in torch.tensor_split(torch.arange(x.shape[0], device=x.device), chunks):
                xs, target = x[at], y[at]
                logits = _upcast(F.linear(xs, weight, bias))
                lse = torch.logsumexp(logits, dim=-1)
                total = total + (lse - logits.gather(1, target[:, None]).squeeze(1)).sum()
                probs = logits.sub_(lse[:, None]).exp_()  # in place: the slice's d(sum)/d logits
                probs[torch.arange(len(at), device=x.device), target] -= 1
                if grad_x is not None:
                    grad_x[at] = (probs.to(weight.dtype) @ weight).to(x.dtype)
                if grad_w is not None and weight.dtype == wide:
                    grad_w.addmm_(probs.t(), xs)
                elif grad_w is not None:  # bf16/fp16: the product in the weight's dtype (as standard's backward), summed in fp32
                    grad_w += probs.t().to(weight.dtype) @ xs.to(weight.dtype)
                if grad_b is not None:
                    grad_b += probs.sum(0)
            ctx.save_for_backward(*(t for t in (grad_x, grad_w, grad_b) if t is not None))
            ctx.present = (grad_x is not None, grad_w is not None, grad_b is not None)
            ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
            return total

        @staticmethod
        def backward(ctx, g):
            saved = iter(ctx.saved_tensors)
            grad_x, grad_w, grad_b = (next(saved) if present else None for present in ctx.present)
            return (None if grad_x is None else grad_x * g.to(grad_x.dtype),
                    None if grad_w is None else (grad_w * g).to(ctx.dtypes[0]),
                    None if grad_b is None else (grad_b * g).to(ctx.dtypes[1]), None, None)

    return SummedCrossEntropy


def _fused_loss_sum(head, x, y, chunks: int):
    """The summed cross-entropy of rows `x` against `y` through a Linear head, gradients computed in the
    forward pass. Run as the head module's own forward: ZeRO-3's hooks gather its (partitioned, maybe
    tied) weight around it, and again before its backward, where the weight's gradient arrives whole."""
    function = _summed_cross_entropy()
    before = head.__dict__.get("forward")
    head.forward = lambda rows: function.apply(rows, head.weight, head.bias, y, chunks)
    try:
        return head(x)
    finally:
        if before is None:
            del head.forward
        else:
            head.forward = before


def chunked_loss(hidden, labels, head: Callable[[Any], Any], chunks: int, shift_labels=None, count=None):
    """Mean next-token cross-entropy over the label tokens (!= IGNORE) of `labels` (B x T, unshifted)
    given the last hidden states (B x T x H) and the LM head, the labelled positions in `chunks`
    near-equal slices. Equals F.cross_entropy(head(hidden)[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
    (nan when nothing is labelled, as there). With gradients, a Linear head is called once and the
    gradients made in forward (_fused_loss_sum); any other head, and every head without gradients, is
    called exactly `chunks` times (empty slices too), each chunk recomputed in backward.
    A sequence-parallel shard (trainer/sequence_parallel.py) gives `shift_labels` (shifted already)
    and `count`, the whole sequence's label count: the sum over this shard's positions / count."""
    import torch
    from torch.utils.checkpoint import checkpoint

    target = shift_labels.reshape(-1) if shift_labels is not None else shifted_targets(labels)
    where = (target != IGNORE).nonzero().squeeze(1)  # only labelled positions need logits
    flat = hidden.reshape(-1, hidden.size(-1))
    if torch.is_grad_enabled() and isinstance(head, torch.nn.Linear):
        total = _fused_loss_sum(head, flat[where], target[where], chunks)
    else:
        total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
        for at in torch.tensor_split(where, chunks):
            if torch.is_grad_enabled():
                # Deterministic: no RNG state to keep. The head module runs again in backward, so ZeRO-3
                # gathers its weight again there (its own hooks), as for any checkpointed module.
                total = total + checkpoint(_chunk_loss_sum, head, flat[at], target[at], use_reentrant=False,
                                           preserve_rng_state=False)
            else:
                total = total + _chunk_loss_sum(head, flat[at], target[at])
    if count is not None:
        return total / count
    return total / where.numel() if where.numel() else total / 0.0


def chunked_sums(hidden, labels, head: Callable[[Any], Any], chunks: int) -> tuple[float, float, float]:
    """(loss_sum, tokens, correct) of a batch without gradients, as the task's batch_sums computes
    them from the full logits: position t predicts token t + 1, label tokens only; the head called
    `chunks` times, as in chunked_loss."""
    import torch
    import torch.nn.functional as F

    target = shifted_targets(labels)
    where = (target != IGNORE).nonzero().squeeze(1)
    flat = hidden.reshape(-1, hidden.size(-1))
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for at in torch.tensor_split(where, chunks):
            logits = _upcast(head(flat[at]))
            loss_sum += float(F.cross_entropy(logits, target[at], reduction="sum"))
            correct += int((logits.argmax(-1) == target[at]).sum())
    return loss_sum, float(where.numel()), float(correct)


# Config attributes of models whose logits are more than the head of the last hidden states.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def head_only_logits(config: Any) -> bool:
    """Whether a causal LM's logits are its output embedding applied to its last hidden states and
    nothing else (Gemma 2's soft-capping, Cohere's and Granite's scaling are refused: the chunked
    path would silently differ)."""
    return not any(getattr(config, key, None) for key in _LOGIT_TRANSFORMS)


def liger_refusal(on_cuda: bool, has_liger: bool) -> str | None:
    """Why train.loss_impl: liger cannot run here (None: it can)."""
    if on_cuda and has_liger:
        return None
    why = "the workers here have no CUDA GPU" if has_liger else "liger-kernel is not installed (pip install 'sft[liger]')"
    return (f"train.loss_impl: liger is liger-kernel's fused linear cross-entropy (Triton), which runs on CUDA "
            f"GPUs only; {why}; use chunked (plain torch, any device) or auto")


def loss_implementation(cfg: Any, model_config: Any, on_cuda: bool, has_liger: bool) -> LossImpl:
    """train.loss_impl resolved for a run of `cfg` (a RunConfig) on a model of `model_config`:
    standard for tasks without a chunked loss; a ConfigError when chunked or liger cannot run.
    Every rank resolves the same (the config and the model's config only)."""
    from trainer.config import ConfigError
    from trainer.tasks.registry import TASKS

    asked = cfg.train.loss_impl
    if not TASKS[cfg.model.task].chunks_loss:
        return LossImpl("standard")
    supported = head_only_logits(model_config)
    if asked in ("chunked", "liger") and not supported:
        found = [k for k in _LOGIT_TRANSFORMS if getattr(model_config, k, None)]
        raise ConfigError(f"train.loss_impl: {asked} computes the logits as the LM head of the last hidden "
                          f"states, but this model transforms them ({', '.join(found)}); use standard or auto")
    if asked == "liger" and (refusal := liger_refusal(on_cuda, has_liger)):
        raise ConfigError(refusal)
    # A sequence-parallel rank computes the logits of its 1/N of the positions (trainer/sequence_parallel.py).
    length = math.ceil(cfg.data.max_length / cfg.scaling.sequence_parallel)
    mb, vocab = cfg.train.micro_batch_size, int(getattr(model_config, "vocab_size", 0) or 0)
    has_liger = has_liger and cfg.scaling.sequence_parallel == 1  # auto never picks liger for a shard (unverified)
    name = resolve_loss_impl(asked, on_cuda, has_liger, mb, length, vocab, cfg.deepspeed.zero_stage, supported)
    return LossImpl(name, chunk_count(mb, length, vocab) if name != "standard" else 1)
