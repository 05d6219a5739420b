"""SepME-style separable erasure: G-CiRs (early stopping + ‖Δ‖² penalty) and weight decoupling.

The edited layers are the ones fed by the label context: every ``attn2.to_k`` and ``attn2.to_v`` (W, ``(out, D)``).
The concept loss is the KL-to-null ESD loss (`~d3pm_hub.erasure.common.erasure_loss`): the erased label's x0
distribution is pulled to softmax(z*), z* = z_∅ − α (z_e − z_∅).

* **G-CiRs** — minimise L_c(θ₀ + Δ) + λ ‖Δ‖² and stop once L_c stops improving (`EarlyStopping`), so the
  increment does no more than the concept needs.
* **Weight decoupling** — after every step each ΔW is projected onto the null space of the *preserved* context
  tokens C ``(n, D)`` (the per-label tokens of every other digit and of the null label, and the shared tokens):

      ΔW ← ΔW (I − C⁺ C)      so that      ΔW p = 0  for every preserved token p.

  Keys and values of every other label, and of the null label, are then exactly those of the base model (up to
  the float16 rounding of a saved delta, `ConceptDelta.save`): the other labels' outputs do not change, and
  deltas for different digits (each annihilating the others' tokens) add, scale and remove exactly. This needs
  n < D (22 preserved tokens for 10 digits with 2 tokens each plus 2 shared; D = 64 in the shipped model).
* **Restoration** — dropping a digit's delta (`~d3pm_hub.deltas.remove_deltas`, or composing without it)
  brings that digit back and leaves the others erased.
"""

from __future__ import annotations

import torch

from ..deltas import ConceptDelta
from ..pipeline import D3PMPipeline
from ..unet import D3PMUNet
from .common import (
    EarlyStopping,
    check_digits,
    context_tokens,
    erasure_loss,
    frozen_copy,
    optimise_increment,
    select_parameters,
)


def decoupling_projector(unet: D3PMUNet, digits: list[int]) -> torch.Tensor:
    """P = I − C⁺ C ``(D, D)`` float64 for the context tokens C of every label but ``digits`` (null included).

    Raises ValueError when the preserved tokens span the whole context space (nothing is left to edit).
    """
    kept = [label for label in range(unet.null_label + 1) if label not in digits]
    preserved = context_tokens(unet, kept)  # (n, D)
    projector = torch.eye(preserved.shape[1], dtype=torch.float64) - torch.linalg.pinv(preserved) @ preserved
    erased = context_tokens(unet, digits)[: -len(unet.shared_context_tokens)]
    if (erased @ projector).norm() < 1e-6 * erased.norm():
        raise ValueError(
            "The erased label's tokens lie in the span of the preserved tokens: no decoupled edit exists "
            f"(cross_attention_dim {preserved.shape[1]}, {len(preserved)} preserved tokens)."
        )
    return projector


def erase_sepme(
    pipeline: D3PMPipeline,
    digits: list[int],
    alpha: float = 1.0,
    loss: str = "kl",
    steps: int = 400,
    learning_rate: float = 1e-3,
    batch_size: int = 16,
    l2_penalty: float = 1e-4,
    patience: int = 50,
    min_relative_improvement: float = 0.01,
    decouple: bool = True,
    seed: int = 0,
    base_model: str = "",
) -> ConceptDelta:
    """Erase ``digits`` by a decoupled, early-stopped edit of every ``attn2.to_k/to_v``.

    Args:
        pipeline: the trained base pipeline (not modified).
        digits: labels to erase.
        alpha: negative-guidance strength of the target z* = z_∅ − α (z_e − z_∅).
        loss: ``"kl"`` (default) or ``"mse"``.
        steps: the most optimisation steps (early stopping usually ends sooner).
        learning_rate, batch_size: Adam on x_t from real images of the erased digits.
        l2_penalty: λ of λ ‖Δ‖².
        patience, min_relative_improvement: the G-CiRs stopping rule (`EarlyStopping`).
        decouple: project increments onto the null space of the preserved tokens (off only for ablations).
        seed: seed of batches, timesteps and noise.
        base_model: where the base came from (recorded in the metadata).
    """
    digits = check_digits(pipeline.unet, digits)
    frozen = frozen_copy(pipeline)
    projector = decoupling_projector(frozen, digits).to(frozen.device) if decouple else None

    def project(group: int, name: str, increment: torch.Tensor) -> torch.Tensor:
        return (increment.double() @ projector).to(increment.dtype)

    loss_fn = erasure_loss(frozen, pipeline.scheduler, digits, alpha, loss, batch_size)
    stopping = EarlyStopping(patience=patience, min_relative_improvement=min_relative_improvement)
    result = optimise_increment(
        frozen,
        select_parameters(frozen, "context"),
        loss_fn,
        steps,
        learning_rate,
        l2_penalty=l2_penalty,
        project=project if decouple else None,
        early_stopping=stopping,
        seed=seed,
    )
    hyperparameters = dict(
        alpha=alpha,
        loss=loss,
        steps=steps,
        learning_rate=learning_rate,
        batch_size=batch_size,
        l2_penalty=l2_penalty,
        patience=patience,
        min_relative_improvement=min_relative_improvement,
        decouple=decouple,
        seed=seed,
    )
    metrics = {
        "erase_seconds": round(result.seconds, 2),
        "steps_run": result.steps,
        "final_concept_loss": result.history[-1]["concept"],
    }
    return ConceptDelta.create(frozen, result.increments[0], digits, "sepme", hyperparameters, base_model, metrics)
