"""Closed-form erasure (UCE, Gandikota et al. 2024) on every cross-attention ``to_k`` and ``to_v``.

Each ``attn2.to_k`` / ``attn2.to_v`` is a linear map W ``(out, D)`` applied to the context tokens. Every token c
the edit constrains gets a target c* in the input space (W' c = W c*), and the edited map solves

    W' = argmin Σ_c ω_c ‖W' c − W c*‖² + λ ‖W' − W‖²_F

with the constrained tokens

* the erased label e's per-label tokens eₖ → aₖ − α (eₖ − aₖ): the keys and values of label e become those of
  the target label a (null by default), pushed away from e's own for α > 0 (negative guidance in key/value
  space: W' eₖ = W aₖ − α (W eₖ − W aₖ));
* with ``null_alpha`` β > 0, the null label's per-label tokens ∅ₖ → ∅ₖ − β Σₑ (eₖ − ∅ₖ): the unconditional model
  itself is guided away from the erased digits, which is what lowers their rate among null-label samples below
  the unconditional model's own (≈ 10%, which no edit of label e alone can change);
* every other token (the other digits' per-label tokens, the null label's when β = 0, the shared tokens) → itself
  with weight w = ``preserve_weight``, so other labels keep their keys and values.

λ = ``ridge`` > 0 gives the ridge solution W' = (Σ ω W c* cᵀ + λ W)(Σ ω c cᵀ + λ I)⁻¹ (UCE); λ = 0 (the default)
the exact minimum-norm solution ΔW = W (C* − C)ᵀ (Cᵀ)⁺ — every constraint holds to numerical precision (in
float32; a float16 file rounds it, `ConceptDelta.save`) when the context tokens are independent (there
are 2·11 + 2 = 24 context tokens and D = 64 in the shipped model). With exact constraints each digit's increment
is zero on every other digit's tokens, so deltas for different digits add, scale and remove exactly; their null
label edits add in key/value space (β Σₑ over the erased digits). No gradient steps: milliseconds.
"""

from __future__ import annotations

import time

import torch

from ..deltas import ConceptDelta
from ..pipeline import D3PMPipeline
from .anchors import check_independent
from .common import check_digits, select_parameters


def context_constraints(
    unet, digits: list[int], target_label: int, alpha: float, null_alpha: float, preserve_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens C ``(n, D)``, their targets C* ``(n, D)`` and weights ω ``(n,)`` (float64) of the edit above."""
    width = unet.config.cross_attention_dim
    null = unet.null_label
    with torch.no_grad():
        table = unet.label_embedding.weight.double().reshape(null + 1, -1, width)  # (labels, n, D)
        shared = unet.shared_context_tokens.double()
    tokens, targets, weights = [], [], []
    for digit in digits:
        own, aim = table[digit], table[target_label]
        tokens.append(own)
        targets.append(aim - alpha * (own - aim))
        weights.append(torch.ones(len(own), dtype=torch.float64))
    kept = [label for label in range(null + 1) if label not in digits and not (label == null and null_alpha)]
    if null_alpha:
        tokens.append(table[null])
        targets.append(table[null] - null_alpha * sum(table[digit] - table[null] for digit in digits))
        weights.append(torch.ones(len(table[null]), dtype=torch.float64))
    preserved = torch.cat([table[kept].reshape(-1, width), shared])
    tokens.append(preserved)
    targets.append(preserved)
    weights.append(torch.full((len(preserved),), float(preserve_weight), dtype=torch.float64))
    return torch.cat(tokens), torch.cat(targets), torch.cat(weights)


def erase_closed_form(
    pipeline: D3PMPipeline,
    digits: list[int],
    target_label: int | None = None,
    alpha: float = 0.0,
    null_alpha: float = 0.0,
    ridge: float = 0.0,
    preserve_weight: float = 1.0,
    base_model: str = "",
    method: str = "closed-form",
) -> ConceptDelta:
    """Solve the regression above for every ``attn2.to_k`` / ``attn2.to_v``; returns ΔW = W' − W.

    Args:
        pipeline: the trained base pipeline (not modified).
        digits: labels to erase.
        target_label: label whose context the erased labels are mapped to (default: the null label).
        alpha: push the erased label away from its own keys/values (0 = map exactly onto the target).
        null_alpha: β, guide the null label away from the erased digits (0 = leave it untouched).
        ridge: λ; 0 solves the constraints exactly (minimum-norm ΔW), > 0 is UCE's ridge regression.
        preserve_weight: w, weight of the preserved tokens (only matters when ``ridge`` > 0).
        base_model: where the base came from (recorded in the metadata).
        method: the method name recorded in the delta.
    """
    unet = pipeline.unet
    digits = check_digits(unet, digits)
    target_label = unet.null_label if target_label is None else int(target_label)
    if not 0 <= target_label <= unet.null_label or target_label in digits:
        raise ValueError(f"target_label must be a label in 0..{unet.null_label} that is not erased.")
    if ridge < 0 or preserve_weight <= 0:
        raise ValueError(f"ridge must be ≥ 0 and preserve_weight > 0, got {ridge} and {preserve_weight}.")
    started = time.perf_counter()
    tokens, targets, weights = context_constraints(unet, digits, target_label, alpha, null_alpha, preserve_weight)
    if ridge:
        gram = tokens.T @ (weights[:, None] * tokens) + ridge * torch.eye(tokens.shape[1], dtype=torch.float64)
        # ΔW = W (C* − C)ᵀ Ω C (Cᵀ Ω C + λ I)⁻¹ = W · mixing
        mixing = torch.linalg.solve(gram, ((targets - tokens).T @ (weights[:, None] * tokens)).T).T
    else:
        check_independent(tokens)
        mixing = (targets - tokens).T @ torch.linalg.pinv(tokens.T)  # (D, D): ΔW = W (C* − C)ᵀ (Cᵀ)⁺
    increments = {}
    edited = set(select_parameters(unet, "context"))
    with torch.no_grad():
        for name, weight in unet.named_parameters():
            if name in edited:
                increments[name] = (weight.double() @ mixing).float()
    seconds = time.perf_counter() - started
    hyperparameters = dict(
        target_label=target_label, alpha=alpha, null_alpha=null_alpha, ridge=ridge, preserve_weight=preserve_weight
    )
    metrics = {"erase_seconds": round(seconds, 4)}
    return ConceptDelta.create(unet, increments, digits, method, hyperparameters, base_model, metrics)
