"""Concept-inversion attack: can a fresh label embedding bring an erased digit back?

Freeze the (edited) model and optimise new per-label context tokens e' ``(num_label_tokens, D)`` — initialised
from the null label's, so they carry no trace of the digit — with the diffusion loss on real images of the
erased digit d:

    e'* = argmin_{e'} E_{x0 ∈ d, t, x_t} L(z_θ(x_t, t, [e', shared tokens]), x0)

then sample with e' in label d's slot of the label embedding (through ``unet_parameters``: the one sampling
loop, no shared state). Attack success is the classifier's rate of d among those samples. Edits confined to
the label path (ESD-x, closed form, SepME) can be undone this way; edits to the image path resist longer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..pipeline import D3PMPipeline
from ..training import diffusion_loss
from .common import DigitSampler, frozen_copy


@dataclass
class AttackResult:
    """Learnt tokens ``(num_label_tokens, D)`` at each step budget, the per-step losses and the seconds spent."""

    tokens: dict[int, torch.Tensor]
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def concept_inversion_attack(
    pipeline: D3PMPipeline,
    digit: int,
    budgets: tuple[int, ...] = (50, 1000),
    unet_parameters: dict[str, torch.Tensor] | None = None,
    learning_rate: float = 1e-2,
    batch_size: int = 16,
    loss_type: str = "ce",
    seed: int = 0,
) -> AttackResult:
    """Optimise fresh context tokens for ``digit`` against the frozen model; snapshot them at each budget.

    Args:
        pipeline: the base pipeline.
        digit: the erased digit whose real images drive the attack.
        budgets: optimisation steps at which to keep the tokens (the largest is the number of steps run).
        unet_parameters: the edited weights (e.g. `~d3pm_hub.deltas.compose_parameters`), None for the base.
        learning_rate, batch_size: Adam on the tokens.
        loss_type: ``"ce"`` or ``"hybrid"`` (`~d3pm_hub.training.diffusion_loss`).
        seed: seed of batches and noise.
    """
    frozen = frozen_copy(pipeline)
    if unet_parameters is not None:
        frozen.load_state_dict({k: v.detach() for k, v in unet_parameters.items()}, strict=False)
    width, shared = frozen.config.cross_attention_dim, frozen.shared_context_tokens
    tokens = frozen.label_embedding.weight[frozen.null_label].detach().reshape(-1, width).clone().requires_grad_()
    optimizer = torch.optim.Adam([tokens], lr=learning_rate)
    images = DigitSampler.for_digits(pipeline.scheduler, [digit]).images
    generator = torch.Generator().manual_seed(seed)
    labels = torch.full((batch_size,), digit, device=frozen.device)
    result = AttackResult(tokens={})
    started = time.perf_counter()
    for step in range(1, max(budgets) + 1):
        x0 = images[torch.randint(0, len(images), (batch_size,), generator=generator)].to(frozen.device)
        context = torch.cat([tokens, shared]).expand(batch_size, -1, -1)
        loss = diffusion_loss(frozen, pipeline.scheduler, x0, labels, generator, loss_type, context)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        result.losses.append(loss.item())
        if step in budgets:
            result.tokens[step] = tokens.detach().clone()
    result.seconds = time.perf_counter() - started
    return result


def attacked_parameters(
    pipeline: D3PMPipeline,
    digit: int,
    tokens: torch.Tensor,
    unet_parameters: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """``unet_parameters`` plus a label embedding whose row ``digit`` holds the attack's tokens."""
    unet_parameters = unet_parameters or {}
    embedding = unet_parameters.get("label_embedding.weight", pipeline.unet.label_embedding.weight).detach().clone()
    embedding[digit] = tokens.reshape(-1).to(embedding)
    return {**unet_parameters, "label_embedding.weight": embedding}
