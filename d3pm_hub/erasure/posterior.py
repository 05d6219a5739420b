"""The null label's erasure target: the unconditional model with the erased digits taken out of its mixture.

A model trained with label dropout predicts, for every pixel i, the mixture of its label predictions under the
class posterior of the noisy image:

    p(x0_i | x_t, ∅) = Σ_c p(c | x_t) p(x0_i | x_t, c).

`class_posterior` recovers weights w_c from the frozen model's own predictions, and `null_label_target` removes a
set S of digits from the mixture:

    log p*(x0 | x_t) = log Σ_{c∉S} w_c^γ p_c − log Σ_{c∉S} w_c^γ  −  β (log p_S − log p_∅),   p_S = (1/|S|) Σ_{e∈S} p_e

The first term (``base="posterior"``) is what a model trained without S would predict: every other digit keeps its
share of the unconditional samples. Fitting per-pixel marginals identifies the class only weakly (every label
predicts much the same x0 once x_t is nearly clean), so w is flatter than the true posterior; the sharpness γ > 1
concentrates it (sampled at inference time with 9 erased: 4% 9s at γ = 1, 2% at γ = 3, 0% at γ = 30;
BENCHMARKS.md §3). The optional negative guidance term (β) pushes further from S but favours the digits least like
S: on top of the γ = 30 mixture, guiding away from 9 with β = 1 draws 29% 2s, 28% 0s and no 4s (``"unconditional"``
puts log p_∅ in place of the first term, the shipped deltas' target).

`TargetPool` computes the frozen predictions once for a fixed pool of noisy real digits, so a long joint training
run (every step a different subset S) costs one forward pass per label per pooled image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..scheduler import D3PMScheduler
from ..unet import D3PMUNet
from .common import DigitSampler, guide_away

NULL_TARGET_BASES = ("posterior", "unconditional")


@torch.no_grad()
def class_posterior(
    log_null: torch.Tensor, log_labels: torch.Tensor, iterations: int = 100, pixels: int = 128
) -> torch.Tensor:
    """Mixture weights w ``(C, B)`` (columns sum to 1) with p_∅ ≈ Σ_c w_c p_c at every pixel.

    EM on Σ_i KL(p_∅,i ‖ Σ_c w_c p_c,i) over the ``pixels`` pixels of each image where the labels' predictions
    differ most (background pixels, where every label agrees, carry no information and only slow EM down):

        r_{c,i}(k) = w_c p_c,i(k) / Σ_c' w_c' p_c',i(k),      w_c ← mean_i Σ_k p_∅,i(k) r_{c,i}(k).

    Args:
        log_null: log p_∅ ``(B, K, H, W)``; log_labels: log p_c ``(C, B, K, H, W)`` for every label c.
    """
    num_labels, batch, levels = log_labels.shape[:3]
    log_labels, log_null = log_labels.flatten(3).float(), log_null.flatten(2).float()
    spread = (log_labels.exp() - log_null.exp()).abs().sum(2).amax(0)  # (B, H·W): largest total variation
    chosen = spread.topk(min(pixels, spread.shape[1]), dim=1).indices  # (B, M)
    log_labels = log_labels.gather(3, chosen[None, :, None].expand(num_labels, batch, levels, -1))
    null = log_null.gather(2, chosen[:, None].expand(batch, levels, -1)).exp()  # (B, K, M)
    weights = torch.full((num_labels, batch), 1.0 / num_labels, device=null.device)
    for _ in range(iterations):
        joint = weights.log()[..., None, None] + log_labels
        responsibility = (joint - torch.logsumexp(joint, 0, keepdim=True)).exp()
        weights = (null * responsibility).sum(2).mean(2)
        weights = weights / weights.sum(0, keepdim=True)
    return weights


def null_label_target(
    log_null: torch.Tensor,
    log_labels: torch.Tensor,
    posterior: torch.Tensor | None,
    digits: list[int],
    beta: float = 0.0,
    base: str = "posterior",
    sharpness: float = 1.0,
    combine: str = "mixture",
    weights: list[float] | None = None,
) -> torch.Tensor:
    """Target logits ``(B, K, H, W)`` of the null label with ``digits`` erased (module docstring).

    Args:
        log_null: log p_∅ ``(B, K, H, W)``; log_labels: log p_c ``(C, B, K, H, W)``; posterior: w ``(C, B)`` (only
            the ``"posterior"`` base needs it).
        digits: the erased set S; beta: negative guidance strength β; base: ``"posterior"`` or ``"unconditional"``;
        sharpness: the exponent γ on the posterior weights.
        combine: guide away from the mixture of the erased digits, β (log (1/|S|) Σₑ pₑ − log p_∅), or from
            each, β Σₑ (log pₑ − log p_∅) (``"sum"``; `~.common.guide_away`).
        weights: with the sum, a multiplier of β per digit of ``digits`` (β Σₑ wₑ (log pₑ − log p_∅)).
    """
    if base not in NULL_TARGET_BASES:
        raise ValueError(f"Unknown null target base {base!r}; choose one of {NULL_TARGET_BASES}.")
    if base == "posterior" and posterior is None:
        raise ValueError(
            "The 'posterior' null target needs the class posterior weights (TargetPool.build(posterior=True))."
        )
    log_null, log_labels = log_null.float(), log_labels.float()
    target = log_null
    if base == "posterior":
        kept = [label for label in range(len(log_labels)) if label not in digits]
        log_weights = sharpness * posterior[kept].float().clamp_min(1e-12).log()[..., None, None, None]
        target = torch.logsumexp(log_weights + log_labels[kept], 0) - torch.logsumexp(log_weights, 0)
    return guide_away(target, log_null, log_labels[digits], beta, combine, weights) if beta else target


@dataclass
class TargetPool:
    """Frozen predictions for a fixed pool of N noisy real digits (every class), computed once.

    Attributes:
        x_t: ``(N, 1, H, W)`` noisy images; timesteps: ``(N,)``.
        log_null: log p_∅ ``(N, K, H, W)``; log_labels: log p_c ``(C, N, K, H, W)`` (``dtype``, float16 for a pool).
        posterior: `class_posterior` weights ``(C, N)``, or None when not computed.
    """

    x_t: torch.Tensor
    timesteps: torch.Tensor
    log_null: torch.Tensor
    log_labels: torch.Tensor
    posterior: torch.Tensor | None

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        frozen: D3PMUNet,
        scheduler: D3PMScheduler,
        size: int,
        generator: torch.Generator,
        dtype: torch.dtype = torch.float16,
        posterior: bool = True,
        chunk: int = 128,
    ) -> TargetPool:
        """``size`` real digits of every class noised at t ~ U{1..T}, with the frozen model's predictions."""
        sampler = DigitSampler.for_digits(scheduler, list(range(frozen.null_label)))
        labels = torch.arange(frozen.null_label + 1, device=frozen.device)
        parts: list[tuple[torch.Tensor, ...]] = []
        for start in range(0, size, chunk):
            _, x_t, timesteps, _ = sampler.draw(scheduler, min(chunk, size - start), generator, frozen.device)
            batch = len(x_t)
            logits = frozen(
                x_t.repeat(len(labels), 1, 1, 1), timesteps.repeat(len(labels)), labels.repeat_interleave(batch)
            )
            log_probs = torch.log_softmax(logits.float(), dim=1).unflatten(0, (len(labels), batch))
            weights = class_posterior(log_probs[-1], log_probs[:-1]) if posterior else torch.empty(0, batch)
            parts.append((x_t, timesteps, log_probs[-1].to(dtype), log_probs[:-1].to(dtype), weights))
        x_t, timesteps, log_null, log_labels, weights = (
            torch.cat([part[i].cpu() for part in parts], dim=1 if i >= 3 else 0) for i in range(5)
        )
        return cls(x_t, timesteps, log_null, log_labels, weights if posterior else None)

    def draw(
        self, batch_size: int, generator: torch.Generator, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """A random batch: x_t, t and the target ingredients (log p_∅, log p_c, w) on ``device``."""
        return self.select(torch.randint(0, len(self.x_t), (batch_size,), generator=generator), device)

    def select(
        self, index: torch.Tensor | slice, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """The pooled images at ``index`` (as `draw`)."""
        posterior = None if self.posterior is None else self.posterior[:, index].to(device)
        ingredients = (self.log_null[index].to(device), self.log_labels[:, index].to(device), posterior)
        return self.x_t[index].to(device), self.timesteps[index].to(device), ingredients
