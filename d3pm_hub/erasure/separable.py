"""Separable erasure that also reaches the unconditional model: a decoupled edit of the erased label and the null label.

Mapping the erased label e onto the null label (closed form) cannot push e's rate below the unconditional model's
own rate of e (≈ 10%), and negative guidance of e alone (ESD, SepME) leaves the null label drawing e as before.
This method edits both labels' keys and values in every ``attn2.to_k/to_v``, and nothing else:

* **null label** — the frozen model's unconditional distribution negatively guided away from the erased digits S

      p*(x0 | x_t) ∝ p_∅ · (p_∅ / p_S)^β,   p_S = (1/|S|) Σ_{e∈S} p_e         (β = ``null_alpha``)

  is distilled into the null label's keys and values (KL(p* ‖ p_θ(· | x_t, ∅)) on x_t from real digits of every
  class): the sampler's own "negative prompt", built into the weights. It favours the digits least like S (with 9
  erased, most null samples are 2s). ``null_target="posterior"`` instead distils the unconditional class mixture
  with S removed, Σ_{c∉S} w_c(x_t)^γ p_c (`~d3pm_hub.erasure.posterior.null_label_target`), which keeps every other
  digit's share; sampled exactly it erases 9 completely, but distilled into the null label's keys and values it
  leaves 0–8% of the erased digit (BENCHMARKS.md §3), so it is not the default;
* **erased label** — mapped in closed form onto an anchor digit's keys and values (``anchor="auto"``, the
  default: the digit `~d3pm_hub.erasure.anchors.rank_anchors` finds least able to draw e), so label e draws
  clean digits of the anchor at the base model's confidence, as Concept Ablation anchors a concept. The ranked
  anchors are stored in the delta: when a composition also erases the anchor, label e moves to the next one
  (`~d3pm_hub.erasure.anchors.anchor_corrections`). With ``anchor=None`` label e is trained to the null label's
  target instead (it draws what the edited null label draws, at unconditional quality).

Weight decoupling (as in SepME): every increment ΔW is projected onto the null space of the other digits' tokens
and the shared tokens (ΔW p = 0), so every other label keeps its keys and values exactly (up to the float16
rounding of a saved delta, `ConceptDelta.save`); each digit's increment
touches only its own tokens and the null label's. Deltas therefore compose by addition; their null label edits
add in key/value space, which is not by itself the sum of the negative guidance terms (the network is nonlinear in
them). `erase_separable_jointly` therefore trains one null edit Δ_e per digit *together*: each step draws a subset
S of the digits and fits θ₀ + Σ_{e∈S} Δ_e to S's target p*, so that every
single delta and every sum of up to ``max(subset_sizes)`` of them erases what it should from the null label.
What the sums still miss for pairs, `~d3pm_hub.erasure.interactions.train_pair_interactions` then fits as one
second-order term per pair, applied only when both deltas are composed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..deltas import ConceptDelta
from ..pipeline import D3PMPipeline
from .anchors import rank_anchors
from .closed_form import erase_closed_form
from .common import (
    check_digits,
    frozen_copy,
    logit_divergence,
    optimise_increment,
    select_parameters,
)
from .posterior import TargetPool, null_label_target
from .sepme import decoupling_projector


@dataclass(frozen=True)
class SeparableSettings:
    """Hyper-parameters of `separable` (stored in every delta's metadata).

    Attributes:
        null_target: the null label's target without the erased digits S (`~.posterior.null_label_target`):
            ``"posterior"`` (the unconditional mixture with S's classes removed) or ``"unconditional"`` (p_∅).
        null_sharpness: the exponent γ on the class posterior weights of the ``"posterior"`` target.
        null_alpha: β of the negative guidance away from S added to the null target.
        pool_size: noisy real digits whose frozen predictions are computed once and drawn from (`TargetPool`);
            0: fresh noisy digits and frozen predictions every step.
        anchor: ``"auto"`` (each erased label takes the keys and values of its best-ranked anchor, closed form),
            a digit (that digit first, then the ranked others), or None (erased labels learn the null target).
        steps, learning_rate, batch_size: Adam on x_t from real images of every digit.
        lr_schedule: diffusers learning-rate schedule over ``steps`` (``"constant"``, ``"cosine"``, ...).
        null_keys: train the null label's keys as well as its values (False: values only).
        seed: seed of batches, timesteps and noise.
    """

    null_target: str = "unconditional"
    null_sharpness: float = 30.0
    null_alpha: float = 1.0
    pool_size: int = 0
    anchor: int | str | None = "auto"
    steps: int = 100
    learning_rate: float = 3e-3
    batch_size: int = 16
    lr_schedule: str = "constant"
    null_keys: bool = True
    seed: int = 0


def erase_separable(pipeline: D3PMPipeline, digits: list[int], base_model: str = "", **settings) -> ConceptDelta:
    """One delta erasing ``digits``: erased labels mapped onto anchors, negative guidance in the null label.

    Args:
        pipeline: the trained base pipeline (not modified).
        digits: labels to erase.
        base_model: where the base came from (recorded in the metadata).
        settings: `SeparableSettings` fields.
    """
    groups = [check_digits(pipeline.unet, digits)]
    return separable_deltas(pipeline, groups, (1,), SeparableSettings(**settings), base_model)[0]


def erase_separable_jointly(
    pipeline: D3PMPipeline,
    digits: list[int],
    subset_sizes: tuple[int, ...] = (1, 2),
    base_model: str = "",
    **settings,
) -> list[ConceptDelta]:
    """One delta per digit, with null-label edits trained together so any subset of the deltas composes.

    Each step trains the sum of the null edits of a random subset of ``digits`` (its size drawn uniformly from
    ``subset_sizes``) towards that subset's target. ``settings``: `SeparableSettings` fields, here by default
    3,000 steps with a cosine learning-rate schedule and β = 2 (the mixture target tolerates a stronger β than one
    digit needs, and β = 2 holds pairs; β = 3 overshoots into shapes read as the erased digit, BENCHMARKS.md §3).
    """
    digits = check_digits(pipeline.unet, digits)
    if not subset_sizes or not all(1 <= size <= len(digits) for size in subset_sizes):
        raise ValueError(f"subset_sizes must lie in 1..{len(digits)} (the number of digits), got {subset_sizes}.")
    settings = SeparableSettings(**{"steps": 3000, "null_alpha": 2.0, "lr_schedule": "cosine"} | settings)
    return separable_deltas(pipeline, [[digit] for digit in digits], tuple(subset_sizes), settings, base_model)


def separable_deltas(
    pipeline: D3PMPipeline,
    groups: list[list[int]],
    subset_sizes: tuple[int, ...],
    settings: SeparableSettings,
    base_model: str = "",
) -> list[ConceptDelta]:
    """A separable delta per group of digits; null edits trained on subsets of groups (sizes ``subset_sizes``)."""
    anchor, batch_size, seed = settings.anchor, settings.batch_size, settings.seed
    frozen = frozen_copy(pipeline)
    null = frozen.null_label
    erased = [digit for group in groups for digit in group]
    anchors = None if anchor is None else choose_anchors(frozen, pipeline.scheduler, erased, anchor, seed, groups)
    trained = [[null] if anchor is not None else [*group, null] for group in groups]
    projectors = [decoupling_projector(frozen, labels).to(frozen.device) for labels in trained]
    device = frozen.device
    needs_posterior = settings.null_target == "posterior"
    pool = None
    if settings.pool_size:
        generator = torch.Generator().manual_seed(seed)
        pool = TargetPool.build(frozen, pipeline.scheduler, settings.pool_size, generator, posterior=needs_posterior)

    def draw_batch(generator: torch.Generator):
        if pool is not None:
            return pool.draw(batch_size, generator, device)
        fresh = TargetPool.build(frozen, pipeline.scheduler, batch_size, generator, torch.float32, needs_posterior)
        return fresh.select(slice(None), device)

    def draw_subset(generator: torch.Generator) -> list[int]:
        if len(groups) == 1:
            return [0]
        size = subset_sizes[torch.randint(len(subset_sizes), (), generator=generator)]
        return torch.randperm(len(groups), generator=generator)[:size].tolist()

    def loss_fn(model, generator: torch.Generator) -> dict[str, torch.Tensor]:
        subset = draw_subset(generator)
        x_t, timesteps, ingredients = draw_batch(generator)
        digits = [digit for g in subset for digit in groups[g]]
        target = null_label_target(
            *ingredients, digits, settings.null_alpha, settings.null_target, settings.null_sharpness
        )
        labels = [label for g in subset for label in trained[g] if label != null] + [null]
        predicted = model(
            x_t.repeat(len(labels), 1, 1, 1),
            timesteps.repeat(len(labels)),
            torch.tensor(labels, device=device).repeat_interleave(batch_size),
            groups=subset,
        )
        loss = logit_divergence(predicted, target.repeat(len(labels), 1, 1, 1), "kl")
        return {"loss": loss, "concept": loss}

    result = optimise_increment(
        frozen,
        [name for name in select_parameters(frozen, "context") if settings.null_keys or ".to_v." in name],
        loss_fn,
        settings.steps,
        settings.learning_rate,
        project=lambda group, name, increment: (increment.double() @ projectors[group]).to(increment.dtype),
        num_groups=len(groups),
        seed=seed,
        lr_schedule=settings.lr_schedule,
    )
    hyperparameters = dataclasses.asdict(settings)
    if len(groups) > 1:
        hyperparameters |= dict(jointly_with=erased, subset_sizes=list(subset_sizes))
    metrics = {"erase_seconds": round(result.seconds, 2), "final_loss": result.history[-1]["loss"]}
    deltas = []
    for group, increments in zip(groups, result.increments, strict=True):
        group_anchors = None if anchors is None else {digit: anchors[digit] for digit in group}
        for digit, ranked in (group_anchors or {}).items():
            mapped = erase_closed_form(pipeline, [digit], target_label=ranked[0])
            increments = {name: increments.get(name, 0) + value for name, value in mapped.tensors.items()}
        recorded = hyperparameters | {"anchors": group_anchors}
        deltas.append(ConceptDelta.create(frozen, increments, group, "separable", recorded, base_model, metrics))
    return deltas


def choose_anchors(
    unet, scheduler, digits: list[int], anchor: int | str, seed: int = 0, groups: list[list[int]] | None = None
) -> dict[int, list[int]]:
    """Ranked anchors per erased digit: `rank_anchors` order, with a given ``anchor`` digit moved first.

    A digit never anchors onto a digit of its own group (``groups``; by default all ``digits`` are one group), so
    a group of every digit is refused.
    """
    groups = groups or [digits]
    if anchor != "auto" and (
        isinstance(anchor, str)
        or not 0 <= int(anchor) < unet.null_label
        or any(int(anchor) in group for group in groups)
    ):
        raise ValueError(
            f"anchor must be 'auto', None or a digit in 0..{unet.null_label - 1} that the same delta does not "
            f"erase, got {anchor!r}."
        )
    if any(set(range(unet.null_label)) <= set(group) for group in groups):
        raise ValueError(
            "A delta that erases every digit leaves no digit to anchor its labels on: set anchor to None "
            "(--set anchor=null: the labels are trained to the edited null label), or make one delta per digit "
            "(--each, or --jointly)."
        )
    anchors = {}
    for group in groups:
        for digit in group:
            ranked = rank_anchors(unet, scheduler, digit, excluded=tuple(group), seed=seed)
            if anchor != "auto":
                ranked = [int(anchor)] + [a for a in ranked if a != int(anchor)]
            anchors[digit] = ranked
    return anchors
