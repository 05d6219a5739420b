"""Anchors: the digit an erased label draws instead, chosen so it is never the erased one — even in compositions.

Mapping an erased label e onto another label's keys and values (Concept Ablation's anchor concept) makes label e
draw that label's samples: clean digits at the base model's confidence. Two choices make this safe:

* **which anchor** — `rank_anchors` orders the other digits by how badly their conditional model explains real
  images of e (the x0 cross-entropy of noised real e's under each label, highest first): the first anchor is the
  digit whose samples are least likely to look like e;
* **compositions** — an anchor may itself be erased by another delta in the same composition; label e would
  then draw the base model's anchor digit and bring it back. `anchor_corrections` re-anchors such labels at
  composition time onto their first anchor that no delta in the composition erases (the null label, as edited,
  when every digit is erased). The correction is closed form, acts on label e's tokens only and is linear in
  the delta's strength, so composition stays exact and removing the delta removes it.

Keys and values of a context token c are W c for every ``attn2.to_k/to_v`` W ``(out, D)``. With all context
tokens C ``(N, D)`` linearly independent (N = labels·tokens + shared ≤ D), ΔW = M (Cᵀ)⁺ changes the outputs on
the tokens by exactly the columns of M ``(out, N)`` — here nonzero only on e's tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..scheduler import D3PMScheduler
from ..unet import D3PMUNet
from .common import DigitSampler

EMBEDDING = "label_embedding.weight"
SHARED_TOKENS = "shared_context_tokens"


@torch.no_grad()
def rank_anchors(
    unet: D3PMUNet,
    scheduler: D3PMScheduler,
    digit: int,
    excluded: tuple[int, ...] = (),
    batches: int = 4,
    batch_size: int = 64,
    seed: int = 0,
) -> list[int]:
    """Digits other than ``digit`` and ``excluded``, best anchor first.

    Score of a label a: E_{x0 ∈ digit, t, x_t}[CE(z_θ(x_t, t, a), x0)] on ``batches × batch_size`` noised real
    images of ``digit`` (the same x_t for every label). The higher it is, the less label a can draw ``digit``.
    """
    sampler = DigitSampler.for_digits(scheduler, [digit])
    generator = torch.Generator().manual_seed(seed)
    candidates = [a for a in range(unet.null_label) if a != digit and a not in excluded]
    scores = torch.zeros(len(candidates), dtype=torch.float64)
    for _ in range(batches):
        x0, x_t, timesteps, _ = sampler.draw(scheduler, batch_size, generator, unet.device)
        for index, anchor in enumerate(candidates):
            logits = unet(x_t, timesteps, torch.full_like(timesteps, anchor))
            scores[index] += F.cross_entropy(logits.float(), x0[:, 0]).item()
    return [candidates[i] for i in torch.argsort(scores, descending=True).tolist()]


def context_token_table(parameters: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-label tokens ``(L, n, D)`` and all context tokens C ``(L·n + s, D)`` (float64) from a parameter dict."""
    shared = parameters[SHARED_TOKENS].detach().double()
    table = parameters[EMBEDDING].detach().double().reshape(parameters[EMBEDDING].shape[0], -1, shared.shape[1])
    return table, torch.cat([table.reshape(-1, shared.shape[1]), shared])


def check_independent(tokens: torch.Tensor) -> None:
    """Raise unless the context tokens ``(N, D)`` are linearly independent: edits that move some tokens' keys and
    values and hold the others exactly exist only then (N ≤ cross_attention_dim)."""
    rank = int(torch.linalg.matrix_rank(tokens))
    if rank < len(tokens):
        raise ValueError(
            f"The model's {len(tokens)} context tokens span only {rank} dimensions (cross_attention_dim "
            f"{tokens.shape[1]}): no edit can move one label's keys/values and hold every other label's exactly. "
            f"Use a model with cross_attention_dim ≥ {len(tokens)}, or ridge > 0 for an approximate closed form."
        )


def context_token_rows(parameters: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-label tokens and their dual rows R ``(L, n, D)`` (float64): rows of (Cᵀ)⁺, so R_lk · c_j = δ.

    ΔW = M R_l ``(out, D)`` changes the keys/values W c of label l's n tokens by the columns of M ``(out, n)``
    and leaves every other context token's unchanged. Raises ValueError when the tokens are not independent.
    """
    table, tokens = context_token_table(parameters)
    check_independent(tokens)
    rows = torch.linalg.pinv(tokens.T)[: table.shape[0] * table.shape[1]]
    return table, rows.reshape(table.shape)


def anchors_of(hyperparameters: dict) -> dict[int, list[int]]:
    """The ranked anchors a delta recorded per erased digit (``{}`` for deltas without anchors)."""
    return {int(digit): ranked for digit, ranked in (hyperparameters.get("anchors") or {}).items()}


def anchor_corrections(
    base_parameters: dict[str, torch.Tensor],
    composed: dict[str, torch.Tensor],
    deltas: list[tuple],
) -> dict[str, torch.Tensor]:
    """Increments that move every anchored label whose anchor is erased onto its first anchor that is not.

    Args:
        base_parameters: θ₀, every parameter by name.
        composed: θ₀ + Σ sᵢ Δᵢ for the touched parameters (used for the edited null label, the last resort).
        deltas: the composition's (ConceptDelta, strength) pairs; a digit counts as erased when a delta
            with strength ≠ 0 names it.

    Returns: name → increment to add to ``composed`` (empty when no anchor is erased).
    """
    erased = {digit for delta, strength in deltas if strength for digit in delta.concepts}
    corrections: dict[str, torch.Tensor] = {}
    table, rows = None, None
    for delta, strength in deltas:
        for digit, ranked in anchors_of(delta.hyperparameters).items():
            if not strength or ranked[0] not in erased:
                continue
            null = base_parameters[EMBEDDING].shape[0] - 1
            if max(digit, *ranked) >= null:
                raise ValueError(
                    f"The {delta.method} delta anchors digit {digit} on {ranked}: this model's labels are "
                    f"0..{null - 1}."
                )
            if table is None:
                table, rows = context_token_rows(base_parameters)
            target = next((anchor for anchor in ranked if anchor not in erased), len(table) - 1)
            for name in delta.tensors:
                base = base_parameters[name].double()
                source = composed.get(name, base_parameters[name]).double() if target == len(table) - 1 else base
                change = source @ table[target].T - base @ table[ranked[0]].T  # (out, n) on label e's tokens
                increment = (strength * change @ rows[digit]).to(base_parameters[name].dtype)
                corrections[name] = corrections.get(name, 0) + increment
    return corrections
