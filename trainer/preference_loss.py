"""Preference objectives over per-example completion log-probabilities (preference.loss).

Pure functions of tensors, one per objective, each the formula of its paper (TRL's names and
conventions, so its users compare like with like): `logps` are summed over a completion's tokens,
`lengths` are those token counts. Every function returns per-example (losses, chosen rewards,
rejected rewards); the task (trainer/tasks/preference.py) averages the losses and reports the
rewards. Imports torch only; never ray or deepspeed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

Tensor = Any  # torch.Tensor (torch is imported inside the functions, as everywhere in trainer/)


def _sigmoid_loss(logits: Tensor, label_smoothing: float) -> Tensor:
    """-log sigmoid(logits), with a `label_smoothing` share of the pairs taken as flipped."""
    import torch.nn.functional as F

    return -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


def dpo(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float,
        label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """DPO (Rafailov et al. 2023, sigmoid; conservative with label smoothing):
    -log sigma(beta * ((c - c_ref) - (r - r_ref))); rewards beta * (logp - logp_ref)."""
    chosen_rewards, rejected_rewards = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    return _sigmoid_loss(chosen_rewards - rejected_rewards, label_smoothing), chosen_rewards, rejected_rewards


def ipo(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, chosen_lengths: Tensor,
        rejected_lengths: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """IPO (Azar et al. 2023, eq. 17) on per-token averaged log-ratios, as TRL computes it:
    (h - 1 / (2 beta))^2 with h = (c - c_ref) / |c| - (r - r_ref) / |r|; rewards as for DPO."""
    h = (chosen - ref_chosen) / chosen_lengths.clamp(min=1) - (rejected - ref_rejected) / rejected_lengths.clamp(min=1)
    return (h - 1 / (2 * beta)) ** 2, beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)


def simpo(chosen: Tensor, rejected: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor, beta: float,
          gamma: float, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO (Meng et al. 2024), reference-free: -log sigma(beta * (c / |c| - r / |r|) - gamma);
    rewards beta * the per-token average log-probability."""
    chosen_rewards = beta * chosen / chosen_lengths.clamp(min=1)
    rejected_rewards = beta * rejected / rejected_lengths.clamp(min=1)
    return _sigmoid_loss(chosen_rewards - rejected_rewards - gamma, label_smoothing), chosen_rewards, rejected_rewards


def orpo(chosen: Tensor, rejected: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor,
         beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """ORPO (Hong et al. 2024), reference-free: the chosen completion's mean token NLL minus
    beta * log sigma(log odds(c) - log odds(r)), odds(p) = p / (1 - p) of the per-token average
    probability; rewards beta * the average log-probability (as TRL's ORPO reports them)."""
    import torch
    import torch.nn.functional as F

    c, r = chosen / chosen_lengths.clamp(min=1), rejected / rejected_lengths.clamp(min=1)
    # log(1 - exp(x)) for x < 0; log1p(-exp(x)) is exact there (x = 0 exactly would be -inf: clamped)
    log_odds = (c - r) - (torch.log1p(-torch.exp(c).clamp(max=1 - 1e-7)) - torch.log1p(-torch.exp(r).clamp(max=1 - 1e-7)))
    return -c - beta * F.logsigmoid(log_odds), beta * c, beta * r


@dataclass(frozen=True)
class Pairs:
    """One micro-batch's per-example terms: the policy's completion log-probabilities (summed over
    tokens), the completions' token counts and, for objectives that have one, the reference's."""
    chosen: Tensor
    rejected: Tensor
    chosen_lengths: Tensor
    rejected_lengths: Tensor
    ref_chosen: Optional[Tensor] = None
    ref_rejected: Optional[Tensor] = None


def objective(p: Pairs, settings: Any) -> tuple[Tensor, Tensor, Tensor]:
    """(per-example losses, chosen rewards, rejected rewards) of the preference: section `settings`."""
    s = settings
    if s.loss == "dpo":
        return dpo(p.chosen, p.rejected, p.ref_chosen, p.ref_rejected, s.beta, s.label_smoothing)
    if s.loss == "ipo":
        return ipo(p.chosen, p.rejected, p.ref_chosen, p.ref_rejected, p.chosen_lengths, p.rejected_lengths, s.beta)
    if s.loss == "simpo":
        return simpo(p.chosen, p.rejected, p.chosen_lengths, p.rejected_lengths, s.beta, s.gamma, s.label_smoothing)
    if s.loss == "orpo":
        return orpo(p.chosen, p.rejected, p.chosen_lengths, p.rejected_lengths, s.beta)
    raise ValueError(f"unknown preference.loss {s.loss!r}")


METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected")  # TRL's names; TaskSpec.metrics of the preference task


def metric_sums(losses: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor, p: Pairs) -> list[float]:
    """The per-example terms summed, in METRICS' order (then the example count): summed across ranks
    and divided by the total count, each example counts once (metrics_from_sums)."""
    return [float(losses.sum()), float(chosen_rewards.sum()), float(rejected_rewards.sum()),
            float((chosen_rewards > rejected_rewards).float().sum()), float((chosen_rewards - rejected_rewards).sum()),
            float(p.chosen.sum()), float(p.rejected.sum()), float(losses.numel())]


def metrics_from_sums(sums: list[float]) -> dict[str, float]:
    """Means over the examples of metric_sums' sums (also summed over ranks); `examples` the count."""
    n = sums[-1]
    return {**{name: value / max(n, 1.0) for name, value in zip(METRICS, sums)}, "examples": n}
