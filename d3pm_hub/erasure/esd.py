"""ESD (Gandikota et al. 2023) on the D3PM's x0 logits, and its discrete-native KL variant.

For an erased digit e, the frozen model gives z_e = z_θ₀(x_t, t, e) and z_∅ = z_θ₀(x_t, t, ∅) (null label).
The edited model's conditional logits are trained towards the negatively guided target

    z* = z_∅ − α (z_e − z_∅)                                   (α: ESD's η, the "superfactor")

with loss MSE(z_θ(x_t, t, e), z*) (``loss="mse"``, ESD) or KL(softmax(z*) ‖ softmax(z_θ)) (``loss="kl"``, the
KL-to-null variant: it matches x0 *distributions*, which is what the D3PM samples from; α = 0 makes it plain
"label e behaves like the null label"). Parameter sets (`select_parameters`): ``x`` cross-attention only,
``u`` everything but cross-attention, ``full`` the whole network.
"""

from __future__ import annotations

from ..deltas import ConceptDelta
from ..pipeline import D3PMPipeline
from .common import check_digits, erasure_loss, frozen_copy, optimise_increment, select_parameters


def erase_esd(
    pipeline: D3PMPipeline,
    digits: list[int],
    parameters: str = "x",
    alpha: float = 1.0,
    loss: str = "mse",
    steps: int = 200,
    learning_rate: float = 1e-4,
    batch_size: int = 16,
    preserve_weight: float = 0.0,
    seed: int = 0,
    base_model: str = "",
) -> ConceptDelta:
    """Erase ``digits`` with ESD; returns the increment of the ``parameters`` set as a `ConceptDelta`.

    Args:
        pipeline: the trained base pipeline (not modified).
        digits: labels to erase.
        parameters: ``"x"``, ``"u"`` or ``"full"``.
        alpha: negative-guidance strength α of the target z* = z_∅ − α (z_e − z_∅).
        loss: ``"mse"`` on logits (ESD) or ``"kl"`` on x0 distributions.
        steps, learning_rate, batch_size: Adam optimisation (x_t from real images of the erased digits).
        preserve_weight: weight of an optional term keeping other digits' and the null label's logits at
            the frozen model's (0 = plain ESD).
        seed: seed of batches, timesteps and noise.
        base_model: where the base came from (recorded in the metadata).
    """
    digits = check_digits(pipeline.unet, digits)
    frozen = frozen_copy(pipeline)
    names = select_parameters(frozen, parameters)
    loss_fn = erasure_loss(frozen, pipeline.scheduler, digits, alpha, loss, batch_size, preserve_weight)
    result = optimise_increment(frozen, names, loss_fn, steps, learning_rate, seed=seed)
    hyperparameters = dict(
        parameters=parameters,
        alpha=alpha,
        loss=loss,
        steps=steps,
        learning_rate=learning_rate,
        batch_size=batch_size,
        preserve_weight=preserve_weight,
        seed=seed,
    )
    method = f"esd-{parameters}" + ("-kl" if loss == "kl" else "") + ("-preserve" if preserve_weight else "")
    metrics = {"erase_seconds": round(result.seconds, 2), "final_concept_loss": result.history[-1]["concept"]}
    return ConceptDelta.create(frozen, result.increments[0], digits, method, hyperparameters, base_model, metrics)
