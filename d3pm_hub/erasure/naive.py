"""Naive erasure: fine-tune every weight on the training data with the erased digits removed.

The seed blog's baseline, kept as the floor: the erased label simply never appears in the fine-tuning data,
so nothing asks the model to forget what it does with it. Labels are dropped to the null label with
probability ``label_dropout`` as in training, so the unconditional model is refitted on the other digits.
"""

from __future__ import annotations

import torch

from ..deltas import ConceptDelta
from ..pipeline import D3PMPipeline
from ..training import diffusion_loss
from .common import DigitSampler, check_digits, frozen_copy, optimise_increment, select_parameters


def erase_naive(
    pipeline: D3PMPipeline,
    digits: list[int],
    steps: int = 200,
    learning_rate: float = 1e-4,
    batch_size: int = 32,
    label_dropout: float = 0.1,
    loss_type: str = "hybrid",
    seed: int = 0,
    base_model: str = "",
) -> ConceptDelta:
    """Fine-tune all parameters with `diffusion_loss` on digits ∉ ``digits``; returns the increment.

    Args:
        pipeline: the trained base pipeline (not modified).
        digits: labels whose images are left out.
        steps, learning_rate, batch_size: Adam fine-tuning.
        label_dropout: probability of training a sample under the null label.
        loss_type: ``"hybrid"`` or ``"ce"`` (as in training).
        seed: seed of batches and noise.
        base_model: where the base came from (recorded in the metadata).
    """
    digits = check_digits(pipeline.unet, digits)
    frozen = frozen_copy(pipeline)
    scheduler = pipeline.scheduler
    kept = DigitSampler.for_digits(scheduler, [d for d in range(frozen.null_label) if d not in digits])
    device = frozen.device

    def loss_fn(model, generator: torch.Generator) -> dict[str, torch.Tensor]:
        index = torch.randint(0, len(kept.images), (batch_size,), generator=generator)
        x0, labels = kept.images[index].to(device), kept.labels[index].to(device)
        drop = (torch.rand(batch_size, generator=generator) < label_dropout).to(device)
        labels = torch.where(drop, torch.full_like(labels, frozen.null_label), labels)
        loss = diffusion_loss(model, scheduler, x0, labels, generator, loss_type)
        return {"loss": loss, "concept": loss}

    names = select_parameters(frozen, "all")
    result = optimise_increment(frozen, names, loss_fn, steps, learning_rate, seed=seed)
    hyperparameters = dict(
        steps=steps,
        learning_rate=learning_rate,
        batch_size=batch_size,
        label_dropout=label_dropout,
        loss_type=loss_type,
        seed=seed,
    )
    metrics = {"erase_seconds": round(result.seconds, 2), "final_loss": result.history[-1]["loss"]}
    return ConceptDelta.create(frozen, result.increments[0], digits, "naive", hyperparameters, base_model, metrics)
