"""On-policy corrections of null-label edits: fitted where the edited sampler goes, not on noised real digits.

A null-label edit distilled on noised real digits (`~.separable`) leaves a small error that the sampler compounds:
its trajectories drift into states the training never saw, where the error is largest (the digit 2, which the
unconditional model draws readily, came back in 2.5% of null-label samples at 400 samples per cell). As in
DAgger, a round here draws null-label samples with a composition of deltas applied, keeps the states x_t they
visit, and fits one correction ΔW per composition there, to the frozen model's target with the composition's digits
erased (`erased_null_target`):

    min_ΔW  E_{x_t ~ sampler(θ₀ + Σ Δ)} KL(p*_S(· | x_t) ‖ p_{θ₀ + Σ Δ + ΔW}(· | x_t, ∅))

ΔW is projected as the singles are (`~.sepme.decoupling_projector` of the null label), so no other label's keys or
values move. `fit_corrections` is one round for any list of compositions: `refine_singles` adds its corrections to
single deltas, `~.interactions.train_pair_interactions` stores them as pair terms.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from dataclasses import dataclass

import torch

from ..deltas import ConceptDelta, compose_parameters
from ..pipeline import DEFAULT_NUM_INFERENCE_STEPS, D3PMPipeline
from ..unet import D3PMUNet
from .common import (
    ConceptIncrements,
    frozen_copy,
    logit_divergence,
    low_rank_factors,
    optimise_increment,
    select_parameters,
)
from .posterior import class_posterior, null_label_target
from .sepme import decoupling_projector

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundSettings:
    """One on-policy round (`fit_corrections`).

    Attributes:
        steps: Adam steps; each trains one random composition's correction (about ``steps / compositions`` each).
        learning_rate, batch_size, lr_schedule: as in `~.separable.SeparableSettings`.
        trajectories: null-label samples per composition whose states x_t the correction is fitted on.
        eval_trajectories: further samples per composition whose states give the held-out KL before and after.
        seed: seed of the trajectories, the compositions drawn and the batches.
        timesteps: ``[lo, hi]``: fit (and hold out) only the states with lo ≤ t ≤ hi; None: every state.
    """

    steps: int
    learning_rate: float
    trajectories: int
    batch_size: int = 16
    lr_schedule: str = "cosine"
    eval_trajectories: int = 8
    seed: int = 1
    timesteps: list[int] | None = None


@dataclass(frozen=True)
class SingleSettings:
    """Hyper-parameters of `refine_singles` (stored in each refined delta's ``hyperparameters["single_rounds"]``).

    Attributes:
        rounds: on-policy rounds; each redraws the states with the corrections so far applied.
        steps: Adam steps per digit and round.
        learning_rate, batch_size, lr_schedule, trajectories, eval_trajectories: as in `RoundSettings`
            (``trajectories`` per digit and round).
        seed: seed of round 1; round r uses ``seed + r − 1``, counted over every refinement of the delta (keep it
            apart from the benchmarks' seed 0).
    """

    rounds: int = 2
    steps: int = 300
    learning_rate: float = 1.5e-3
    batch_size: int = 16
    lr_schedule: str = "cosine"
    trajectories: int = 64
    eval_trajectories: int = 8
    seed: int = 100


def refine_singles(
    pipeline: D3PMPipeline, deltas: list[ConceptDelta], **settings
) -> tuple[list[ConceptDelta], dict[str, list[float]]]:
    """On-policy rounds for each single-digit delta's null-label edit, each digit on its own (module docstring).

    The corrections are added to the deltas' increments; they touch the null label only, so every digit's label
    keeps its samples. Pair terms fitted against a refined delta no longer apply (its content hash changes), so the
    refined deltas are returned without theirs: fit them again with `~.interactions.train_pair_interactions`
    (``complete=True`` fits only the pairs that lack a term).

    Args:
        pipeline: the base pipeline the deltas were made for (not modified).
        deltas: single-digit `~.separable` deltas with the same null-label target settings.
        settings: `SingleSettings` fields; more rounds on deltas refined before continue their seeds (the record
            then holds the latest settings and the total rounds and seconds).

    Returns: the refined deltas and each digit's held-out KL to its target ``[before, after]`` on the last round's
    states (``{"2": [...]}``; also stored in each delta's metrics as ``single_kl``).

    Raises:
        ValueError: no rounds, or deltas other than single-digit separable ones, with different targets or
            different numbers of earlier rounds.
    """
    settings = SingleSettings(**settings)
    if settings.rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {settings.rounds}.")
    target_settings = null_target_settings(deltas)
    earlier = {delta.hyperparameters.get("single_rounds", {}).get("rounds", 0) for delta in deltas}
    if len(earlier) != 1:
        raise ValueError(f"Deltas refined together must have run as many single rounds before, got {sorted(earlier)}.")
    done = earlier.pop()
    frozen = frozen_copy(pipeline)
    deltas = [without_pair_terms(delta) for delta in deltas]
    seconds = [delta.hyperparameters.get("single_rounds", {}).get("seconds", 0.0) for delta in deltas]
    fields = {field.name for field in dataclasses.fields(RoundSettings)}
    for round_index in range(done + 1, done + settings.rounds + 1):
        round_settings = RoundSettings(
            **{key: value for key, value in dataclasses.asdict(settings).items() if key in fields}
            | {"steps": settings.steps * len(deltas), "seed": settings.seed + round_index - 1}
        )
        compositions = [[delta] for delta in deltas]
        corrections, kl, spent = fit_corrections(
            pipeline, frozen, compositions, compositions, round_settings, target_settings
        )
        deltas = [add_increments(delta, correction) for delta, correction in zip(deltas, corrections, strict=True)]
        seconds = [round(total + spent, 2) for total in seconds]
    record = dataclasses.asdict(settings) | {"rounds": done + settings.rounds}
    keys = [str(delta.concepts[0]) for delta in deltas]
    refined = [
        with_records(delta, {"single_rounds": record | {"seconds": spent}}, {"single_kl": held})
        for delta, spent, held in zip(deltas, seconds, kl, strict=True)
    ]
    return refined, dict(zip(keys, kl, strict=True))


def fit_corrections(
    pipeline: D3PMPipeline,
    frozen: D3PMUNet,
    compositions: list[list[ConceptDelta]],
    references: list[list[ConceptDelta]],
    settings: RoundSettings,
    target_settings: dict,
    parameter_set: str = "context",
    decouple: bool = True,
    rank: int | None = None,
) -> tuple[list[dict[str, torch.Tensor]], list[list[float]], float]:
    """One on-policy round: a correction ΔW per composition, fitted on the states its null-label samples visit.

    Args:
        pipeline: the base pipeline (not modified); ``frozen``: its frozen UNet (`~.common.frozen_copy`).
        compositions: the deltas composed in each sampler (`~d3pm_hub.deltas.compose_parameters`, pair terms and
            all); each correction is fitted on top of its composition.
        references: per composition, the deltas whose composition gives the held-out KL's "before" column.
        settings: the round's `RoundSettings`.
        target_settings: `null_target_settings` of the singles.
        parameter_set: what ΔW edits (`~.common.select_parameters`). ``"context"`` with ``decouple`` is what deltas
            store: the null label's keys/values only. A wider set, or no decoupling, also moves other labels (the
            shared tokens' keys/values at least), so it cannot ship; it measures what more capacity for the null
            label would buy (`benchmarks/erasure_capacity.py`).
        decouple: project ΔW so that no other label's keys/values move (`~.sepme.decoupling_projector`; only
            with ``"context"``).
        rank: keep each weight's ΔW at this rank (after every step, its best rank-r approximation,
            `~.common.low_rank_factors`: projected gradient descent), so that a term stored as rank-r factors is
            what was fitted; not with ``decouple``.

    Returns: each composition's ΔW (parameter name → increment of its weight), each composition's held-out KL
    ``[reference, composition + ΔW]``, and the optimisation's seconds.
    """
    if decouple and parameter_set != "context":
        raise ValueError(f"Only 'context' edits can be decoupled; pass decouple=False with {parameter_set!r}.")
    if decouple and rank is not None:
        raise ValueError("A decoupled edit is already confined to the null label's tokens: pass rank=None.")
    device, null = frozen.device, frozen.null_label
    names = select_parameters(frozen, parameter_set)
    erased = [[digit for delta in composition for digit in delta.concepts] for composition in compositions]
    generator = torch.Generator().manual_seed(settings.seed)
    banks, held_out, offsets = [], [], []
    for composition in compositions:
        composed = compose_parameters(pipeline.unet, composition)
        banks.append(within(null_label_states(pipeline, composed, settings.trajectories, generator), settings))
        held_out.append(within(null_label_states(pipeline, composed, settings.eval_trajectories, generator), settings))
        offsets.append(increments_over_base(pipeline, composed, names))
    reference_offsets = [
        increments_over_base(pipeline, compose_parameters(pipeline.unet, reference), names) for reference in references
    ]
    logger.info("on-policy round: %d states per composition", len(banks[0][0]))

    def loss(model, index: int, x_t, timesteps, groups: list[int], fixed: list[dict]) -> torch.Tensor:
        target = erased_null_target(frozen, x_t, timesteps, erased[index], target_settings)
        predicted = model(x_t, timesteps, torch.full_like(timesteps, null), groups=groups, offsets=fixed[index])
        return logit_divergence(predicted, target, "kl")

    def loss_fn(model, generator: torch.Generator) -> dict[str, torch.Tensor]:
        index = int(torch.randint(len(compositions), (), generator=generator))
        states, timesteps = banks[index]
        batch = torch.randint(len(states), (settings.batch_size,), generator=generator)
        value = loss(model, index, states[batch].to(device), timesteps[batch].to(device), [index], offsets)
        return {"loss": value, "concept": value}

    result = optimise_increment(
        frozen,
        names,
        loss_fn,
        settings.steps,
        settings.learning_rate,
        project=increment_projection(frozen, decouple, rank),
        num_groups=len(compositions),
        seed=settings.seed,
        lr_schedule=settings.lr_schedule,
    )

    def before(model, index: int, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return loss(model, index, x_t, timesteps, [], reference_offsets)

    def after(model, index: int, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return loss(model, index, x_t, timesteps, [index], offsets)

    model = corrections_model(frozen, names, result.increments)
    return result.increments, held_out_kl(model, [before, after], held_out), result.seconds


def increment_projection(frozen: D3PMUNet, decouple: bool, rank: int | None):
    """What `fit_corrections` projects each ΔW onto after every step: the null space of the other labels' tokens
    (``decouple``), the rank-``rank`` matrices, or nothing (None)."""
    if decouple:
        projector = decoupling_projector(frozen, [frozen.null_label]).to(frozen.device)
        return lambda group, name, delta: (delta.double() @ projector).to(delta.dtype)
    if rank is not None:

        def truncate(group: int, name: str, delta: torch.Tensor) -> torch.Tensor:
            up, down = low_rank_factors(delta, rank)
            return (up @ down).reshape(delta.shape).to(delta.dtype)

        return truncate
    return None


def increments_over_base(
    pipeline: D3PMPipeline, composed: dict[str, torch.Tensor], names: list[str]
) -> dict[str, torch.Tensor]:
    """Composed weights (`~d3pm_hub.deltas.compose_parameters`) of ``names`` minus the base weights."""
    return {
        name: (composed[name] - pipeline.unet.get_parameter(name).detach()).to(pipeline.unet.device)
        for name in names
        if name in composed
    }


@torch.no_grad()
def null_label_states(
    pipeline: D3PMPipeline, parameters: dict[str, torch.Tensor], count: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """States x_t ``(count·(n−1), 1, H, W)`` and their t ``(count·(n−1),)`` that ``count`` null-label samples with
    ``parameters`` pass through at the pipeline's default sampler (n steps; the pure-noise start left out)."""
    scheduler = copy.copy(pipeline.scheduler)
    scheduler.set_timesteps(DEFAULT_NUM_INFERENCE_STEPS)
    upcoming = scheduler.timesteps.tolist()[1:]  # x_t after step k is the input of step k + 1
    states: list[torch.Tensor] = []

    def record(_pipeline, index: int, _timestep: int, outputs: dict) -> None:
        if index < len(upcoming):
            states.append(outputs["sample"].cpu())

    sampler = D3PMPipeline(unet=pipeline.unet, scheduler=pipeline.scheduler)
    sampler.set_progress_bar_config(disable=True)
    null = [pipeline.unet.null_label] * count
    sampler(null, generator=generator, output_type="pt", unet_parameters=parameters, callback_on_step_end=record)
    return torch.cat(states), torch.tensor(upcoming).repeat_interleave(count)


def within(states: tuple[torch.Tensor, torch.Tensor], settings: RoundSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """The states x_t ``(N, 1, H, W)`` and t ``(N,)`` of `null_label_states` inside ``settings.timesteps``.

    Raises:
        ValueError: a window that holds none of the sampler's timesteps.
    """
    if settings.timesteps is None:
        return states
    low, high = settings.timesteps
    x_t, timesteps = states
    inside = (timesteps >= low) & (timesteps <= high)
    if not inside.any():
        steps = timesteps.unique().tolist()
        raise ValueError(f"timesteps {settings.timesteps} holds none of the sampler's timesteps {steps}.")
    return x_t[inside], timesteps[inside]


@torch.no_grad()
def erased_null_target(
    frozen: D3PMUNet, x_t: torch.Tensor, timesteps: torch.Tensor, digits: list[int], target_settings: dict
) -> torch.Tensor:
    """The null label's target logits ``(B, K, H, W)`` with ``digits`` erased, from the frozen model at x_t.

    ``target_settings``: `null_label_target` keywords, and optionally ``digit_weights`` (digit → multiplier of
    β in the sum target, default 1).
    """
    target_settings = dict(target_settings)
    digit_weights = target_settings.pop("digit_weights", None)
    if digit_weights:
        target_settings["weights"] = [float(digit_weights.get(str(digit), 1.0)) for digit in digits]
    posterior = target_settings["base"] == "posterior"
    labels = list(range(frozen.null_label)) if posterior else digits
    every = torch.tensor([*labels, frozen.null_label], device=x_t.device).repeat_interleave(len(x_t))
    logits = frozen(x_t.repeat(len(labels) + 1, 1, 1, 1), timesteps.repeat(len(labels) + 1), every)
    log_probs = torch.log_softmax(logits.float(), dim=1).unflatten(0, (len(labels) + 1, len(x_t)))
    weights = class_posterior(log_probs[-1], log_probs[:-1]) if posterior else None
    erased = digits if posterior else list(range(len(digits)))
    return null_label_target(log_probs[-1], log_probs[:-1], weights, erased, **target_settings)


def null_target_settings(deltas: list[ConceptDelta]) -> dict:
    """The null-label target the singles were trained to (`null_label_target` keywords); they must agree."""
    if not deltas or any(delta.method != "separable" or len(delta.concepts) != 1 for delta in deltas):
        raise ValueError("On-policy rounds need single-digit 'separable' deltas (trained with --jointly).")
    found = {
        json.dumps(
            {
                "beta": delta.hyperparameters.get("null_alpha", 0.0),
                "base": delta.hyperparameters.get("null_target", "unconditional"),
                "sharpness": delta.hyperparameters.get("null_sharpness", 1.0),
            },
            sort_keys=True,
        )
        for delta in deltas
    }
    if len(found) != 1:
        raise ValueError(f"The deltas were trained to different null-label targets ({sorted(found)}): retrain jointly.")
    return json.loads(found.pop())


def corrections_model(frozen: D3PMUNet, names: list[str], increments: list[dict[str, torch.Tensor]]):
    """A `ConceptIncrements` over ``frozen`` holding the trained ``increments`` (one group per composition)."""
    model = ConceptIncrements(frozen, names, len(increments))
    with torch.no_grad():
        for group, trained in zip(model.increments, increments, strict=True):
            for parameter, name in zip(group, names, strict=True):
                parameter.copy_(trained[name])
    return model


@torch.no_grad()
def held_out_kl(model, losses, held_out) -> list[list[float]]:
    """Each composition's held-out KL under each of ``losses`` (``loss(model, index, x_t, t)``): ``[[...], ...]``."""
    device = model.unet.device
    return [
        [round(loss(model, index, x_t.to(device), t.to(device)).item(), 5) for loss in losses]
        for index, (x_t, t) in enumerate(held_out)
    ]


def without_pair_terms(delta: ConceptDelta) -> ConceptDelta:
    """The delta's single increments and metadata, without pair terms."""
    metadata = {key: value for key, value in delta.metadata.items() if key != "interactions"}
    return ConceptDelta(tensors=dict(delta.tensors), metadata=metadata)


def add_increments(delta: ConceptDelta, increments: dict[str, torch.Tensor]) -> ConceptDelta:
    """A copy of ``delta`` (already without pair terms) whose increments have ``increments`` added."""
    tensors = dict(delta.tensors)
    for name, value in increments.items():
        tensors[name] = (tensors[name].float() if name in tensors else 0) + value.detach().float().cpu()
    return ConceptDelta(tensors=tensors, metadata=dict(delta.metadata))


def with_records(delta: ConceptDelta, hyperparameters: dict, metrics: dict) -> ConceptDelta:
    """A copy of ``delta`` with entries added to its hyper-parameters and metrics metadata."""
    metadata = delta.metadata | {
        "hyperparameters": json.dumps(delta.hyperparameters | hyperparameters, sort_keys=True, default=str),
        "metrics": json.dumps(delta.metrics | metrics, sort_keys=True),
    }
    return ConceptDelta(tensors=dict(delta.tensors), metadata=metadata, interactions=dict(delta.interactions))
