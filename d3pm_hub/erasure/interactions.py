"""Pair interaction terms: the second-order part of composing jointly trained null-label edits.

The null label's edits Δ_e of `~.separable.erase_separable_jointly` add in key/value space, but the network is
nonlinear in them, so Δ_a + Δ_b misses the pair's target p*_{ab} by a distillation error the single deltas do not
show: without pair terms, 11 of 45 pairs let a digit back among null-label samples (BENCHMARKS.md §4). An edit
as a function of the erased set S expands as

    Δ(S) = Σ_{a∈S} Δ_a + Σ_{a<b ∈ S} Δ_ab + …

(its Möbius expansion). The jointly trained deltas are the first-order terms; this module fits and applies the
second-order ones:

* `train_pair_interactions` — with the singles frozen, one increment Δ_ab per pair, on the null label's keys and
  values only (projected as the singles are, so no other label moves), fitted to the pair's null-label target:
  KL(p*_{ab} ‖ p_{θ₀+Δa+Δb+Δab}(· | x_t, ∅)) on the states x_t that the pair's null-label samples visit (drawn
  with both singles applied): where it goes wrong, rather than on noised real digits. Later rounds (DAgger-style,
  ``PairSettings.rounds``, or ``refine=True`` on deltas that carry terms) redraw those states with the term in
  place, where the sampler then goes, and fit a correction on top;
* storage — Δ_ab changes nothing but the null label's n tokens' keys/values, so each file stores those changes
  M_ab ``(out, n)`` per edited ``attn2.to_k/to_v`` (a few KB per partner; ΔW = M_ab R_∅ with R_∅ the null
  tokens' dual rows, `~.anchors.context_token_rows`) under ``interaction/{partner}/{parameter}``, in both partners'
  files, with the content hash of the partner delta it was fitted against (``metadata["interactions"]``);
* composition — `interaction_corrections` adds s_a s_b Δ_ab for every pair of composed deltas that name each
  other with matching hashes. The term is bilinear in the strengths: dropping either delta removes it, so removal
  stays exact and restoring a digit leaves the other's single delta.

Triples and larger sets get every pair term among them (the expansion truncated at second order).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import logging
from dataclasses import dataclass

import torch

from ..deltas import FORMAT_VERSION, ConceptDelta, compose_parameters
from ..pipeline import DEFAULT_NUM_INFERENCE_STEPS, D3PMPipeline
from ..unet import D3PMUNet
from .anchors import context_token_rows
from .common import ConceptIncrements, frozen_copy, logit_divergence, optimise_increment, select_parameters
from .posterior import class_posterior, null_label_target
from .sepme import decoupling_projector

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PairSettings:
    """Hyper-parameters of `train_pair_interactions` (stored in every delta's ``hyperparameters["pair_terms"]``).

    Attributes:
        steps: Adam steps of the first round; each trains one random pair's term (about ``steps / pairs`` per pair).
        learning_rate, batch_size, lr_schedule: as in `~.separable.SeparableSettings`.
        trajectories: null-label samples per pair, drawn with both singles applied, whose states x_t the term is
            fitted on: the states the pair's sampler actually visits (its own errors included).
        eval_trajectories: further samples per pair whose states give the held-out KL before and after.
        seed: seed of the trajectories, pairs and batches of the first round (round r uses ``seed + r − 1``; keep
            them apart from the benchmarks' seed 0).
        rounds: on-policy rounds (DAgger). Round r ≥ 2 redraws each pair's states with its term so far applied,
            where the sampler now goes, and fits a correction on top of the term, with the ``refine_*`` settings.
        refine_steps, refine_learning_rate, refine_trajectories: ``steps``, ``learning_rate`` and
            ``trajectories`` of the rounds after the first.
    """

    steps: int = 4500
    learning_rate: float = 3e-3
    batch_size: int = 16
    lr_schedule: str = "cosine"
    trajectories: int = 32
    eval_trajectories: int = 8
    seed: int = 1
    rounds: int = 1
    refine_steps: int = 3000
    refine_learning_rate: float = 1.5e-3
    refine_trajectories: int = 64


def partner_key(delta: ConceptDelta) -> str:
    """How a delta is named as a partner: its erased digits joined by '-' (``"2"``, ``"2-6"``)."""
    return "-".join(map(str, delta.concepts))


def increment_hash(delta: ConceptDelta) -> str:
    """sha256 of a delta's increments rounded to float16 (identical for its float16 and float32 files)."""
    digest = hashlib.sha256()
    for name, value in sorted(delta.tensors.items()):
        digest.update(name.encode())
        digest.update(value.detach().half().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def interaction_partners(delta: ConceptDelta) -> dict[str, str]:
    """Partner key → content hash of the partner delta each stored pair term was fitted against."""
    return json.loads(delta.metadata.get("interactions", "{}"))


def stored_term(delta: ConceptDelta, partner: ConceptDelta, partner_hash: str) -> dict[str, torch.Tensor] | None:
    """The pair term ``delta`` stores for ``partner`` if it was fitted against the increments hashing to
    ``partner_hash`` (`increment_hash`), else None (no term, or a stale one)."""
    key = partner_key(partner)
    if key in delta.interactions and interaction_partners(delta).get(key) == partner_hash:
        return delta.interactions[key]
    return None


def interaction_corrections(
    base_parameters: dict[str, torch.Tensor], deltas: list[tuple[ConceptDelta, float]]
) -> dict[str, torch.Tensor]:
    """Σ_{pairs} s_a s_b Δ_ab for the composed deltas whose pair terms name each other (module docstring).

    A term stored in both partners' files is applied once (their mean; they are equal when written together).

    Raises:
        ValueError: a pair term for a parameter the model lacks or with a shape other than ``(out, n)``.

    Returns: name → increment to add to θ₀ + Σ sᵢ Δᵢ (empty when no pair of deltas interacts).
    """
    if not any(delta.interactions for delta, _ in deltas):
        return {}
    hashes = {id(delta): increment_hash(delta) for delta, _ in deltas}
    corrections: dict[str, torch.Tensor] = {}
    rows = None
    for (first, s_first), (second, s_second) in itertools.combinations(deltas, 2):
        found = [
            stored_term(delta, partner, hashes[id(partner)]) for delta, partner in ((first, second), (second, first))
        ]
        terms = [term for term in found if term is not None]
        if not terms or not s_first * s_second:
            continue
        if rows is None:
            rows = context_token_rows(base_parameters)[1][-1]  # (n, D): the null label's dual rows
        for name in sorted(set().union(*terms)):
            changes = [term[name] for term in terms if name in term]
            for change in changes:
                check_term(base_parameters, name, change, rows.shape[0])
            change = torch.stack(changes).double().mean(0)
            increment = (s_first * s_second * change @ rows).to(base_parameters[name].dtype)
            corrections[name] = corrections.get(name, 0) + increment
    return corrections


def check_term(base_parameters: dict[str, torch.Tensor], name: str, change: torch.Tensor, tokens: int) -> None:
    """A pair term must change an existing weight's outputs on the null label's ``tokens`` tokens."""
    if name not in base_parameters:
        raise ValueError(f"A pair interaction term edits {name!r}, which this model does not have.")
    expected = (base_parameters[name].shape[0], tokens)
    if tuple(change.shape) != expected:
        raise ValueError(f"A pair interaction term for {name!r} has shape {tuple(change.shape)}, expected {expected}.")


def train_pair_interactions(
    pipeline: D3PMPipeline, deltas: list[ConceptDelta], refine: bool = False, **settings
) -> tuple[list[ConceptDelta], dict[str, list[float]]]:
    """Fit a pair term for every pair of ``deltas`` (jointly trained `separable` singles) and store it in both.

    Each round fits each pair's term on the states x_t that null-label samples with both singles (and the pair's
    term so far) applied pass through (`null_label_states`), to the frozen model's target there (`pair_target`),
    computed on the fly: round 1 from no term, round r ≥ 2 a correction added to the term of round r − 1.

    Args:
        pipeline: the base pipeline the deltas were made for (not modified).
        deltas: single-digit `separable` deltas with the same null-label target settings.
        refine: keep the pair terms the deltas carry (all pairs, fitted together with `train_pair_interactions`)
            and run ``rounds`` more rounds on top of them; otherwise terms they carry are replaced.
        settings: `PairSettings` fields (with ``refine``, the first round's fields are those the terms record).

    Returns: copies of the deltas with their pair terms, and the held-out KL of each pair's null label to its
    target without and with its term, on the last round's states (``{"a+b": [without, with]}``; also stored in
    each delta's metrics).

    Raises:
        ValueError: deltas that cannot be paired, or (``refine``) deltas without a complete set of pair terms.
    """
    settings = PairSettings(**settings)
    target_settings = null_target_settings(deltas)
    more = settings.rounds
    if refine:
        recorded = refined_settings(deltas, settings)
        fields = [field.name for field in dataclasses.fields(PairSettings)]
        settings = PairSettings(**{key: value for key, value in recorded.items() if key in fields})
    else:
        recorded = dataclasses.asdict(settings) | {"seconds": 0.0}
        deltas = [without_terms(delta) for delta in deltas]
    frozen = frozen_copy(pipeline)
    first = recorded["rounds"] - more + 1
    for round_index in range(first, recorded["rounds"] + 1):
        terms, kl, seconds = fit_pair_round(pipeline, frozen, deltas, settings, round_index, target_settings)
        recorded["seconds"] = round(recorded["seconds"] + seconds, 2)
        deltas = [with_terms(delta, terms[i], deltas, recorded, kl) for i, delta in enumerate(deltas)]
    return deltas, kl


def fit_pair_round(
    pipeline: D3PMPipeline,
    frozen: D3PMUNet,
    deltas: list[ConceptDelta],
    settings: PairSettings,
    round_index: int,
    target_settings: dict,
) -> tuple[list[dict[str, dict[str, torch.Tensor]]], dict[str, list[float]], float]:
    """One on-policy round: every pair's term plus a correction fitted on the states its current composition visits.

    Returns: each delta's terms by partner (the ``(out, n)`` changes of the null tokens' keys/values), each pair's
    held-out KL ``[without term, with term]``, and the optimisation's seconds.
    """
    first = round_index == 1
    steps, learning_rate, trajectories = (
        (settings.steps, settings.learning_rate, settings.trajectories)
        if first
        else (settings.refine_steps, settings.refine_learning_rate, settings.refine_trajectories)
    )
    seed = settings.seed + round_index - 1
    device, null = frozen.device, frozen.null_label
    names = select_parameters(frozen, "context")
    pairs = list(itertools.combinations(range(len(deltas)), 2))
    digits = [[digit for i in pair for digit in deltas[i].concepts] for pair in pairs]
    generator = torch.Generator().manual_seed(seed)
    banks, held_out, offsets, single_offsets = pair_state_banks(
        pipeline, deltas, names, trajectories, settings.eval_trajectories, generator
    )
    logger.info(
        "pair terms, round %d: %d states per pair from %d trajectories", round_index, len(banks[0][0]), trajectories
    )

    def pair_loss(
        model, index: int, x_t: torch.Tensor, timesteps: torch.Tensor, groups: list[int], fixed
    ) -> torch.Tensor:
        target = pair_target(frozen, x_t, timesteps, digits[index], target_settings)
        predicted = model(x_t, timesteps, torch.full_like(timesteps, null), groups=groups, offsets=fixed[index])
        return logit_divergence(predicted, target, "kl")

    def loss_fn(model, generator: torch.Generator) -> dict[str, torch.Tensor]:
        index = int(torch.randint(len(pairs), (), generator=generator))
        states, timesteps = banks[index]
        batch = torch.randint(len(states), (settings.batch_size,), generator=generator)
        loss = pair_loss(model, index, states[batch].to(device), timesteps[batch].to(device), [index], offsets)
        return {"loss": loss, "concept": loss}

    projector = decoupling_projector(frozen, [null]).to(device)
    result = optimise_increment(
        frozen,
        names,
        loss_fn,
        steps,
        learning_rate,
        project=lambda group, name, increment: (increment.double() @ projector).to(increment.dtype),
        num_groups=len(pairs),
        seed=seed,
        lr_schedule=settings.lr_schedule,
    )
    model = corrections_model(frozen, names, result.increments)

    def without_term(model, index: int, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return pair_loss(model, index, x_t, timesteps, [], single_offsets)

    def with_term(model, index: int, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return pair_loss(model, index, x_t, timesteps, [index], offsets)

    kl = held_out_kl(model, [without_term, with_term], held_out)
    terms = added_terms(frozen, deltas, result.increments)
    keys = {"+".join(partner_key(deltas[i]) for i in pair): value for pair, value in zip(pairs, kl, strict=True)}
    return terms, keys, result.seconds


def added_terms(
    frozen: D3PMUNet, deltas: list[ConceptDelta], corrections: list[dict[str, torch.Tensor]]
) -> list[dict[str, dict[str, torch.Tensor]]]:
    """Each delta's pair terms by partner: the term it carries (if any) plus the pair's fitted correction ΔW,
    stored as the change ΔW T_∅ᵀ ``(out, n)`` of the null tokens' keys/values (T_∅ ``(n, D)`` their context)."""
    null_tokens = context_token_rows(dict(frozen.named_parameters()))[0][-1].cpu()  # (n, D)
    terms: list[dict[str, dict[str, torch.Tensor]]] = [{} for _ in deltas]
    pairs = itertools.combinations(range(len(deltas)), 2)
    for (i, j), increments in zip(pairs, corrections, strict=True):
        previous = deltas[i].interactions.get(partner_key(deltas[j]), {})
        changes = {
            name: previous.get(name, torch.zeros(())).float() + (value.double() @ null_tokens.T).float()
            for name, value in increments.items()
        }
        terms[i][partner_key(deltas[j])] = terms[j][partner_key(deltas[i])] = changes
    return terms


def pair_state_banks(
    pipeline: D3PMPipeline,
    deltas: list[ConceptDelta],
    names: list[str],
    trajectories: int,
    eval_trajectories: int,
    generator: torch.Generator,
) -> tuple[list, list, list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """Per pair (in `itertools.combinations` order): the states its null-label samples visit with the pair's
    current composition (`null_label_states`, ``trajectories`` and ``eval_trajectories`` samples), and the
    increments of ``names`` over the base with and without its pair term."""
    device = pipeline.unet.device
    base = {name: pipeline.unet.get_parameter(name).detach() for name in names}

    def increments(composed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: (composed[name] - base[name]).to(device) for name in names if name in composed}

    banks, held_out, offsets, single_offsets = [], [], [], []
    for i, j in itertools.combinations(range(len(deltas)), 2):
        composed = compose_parameters(pipeline.unet, [deltas[i], deltas[j]])  # with the term so far
        banks.append(null_label_states(pipeline, composed, trajectories, generator))
        held_out.append(null_label_states(pipeline, composed, eval_trajectories, generator))
        offsets.append(increments(composed))
        singles = compose_parameters(pipeline.unet, [without_terms(deltas[i]), without_terms(deltas[j])])
        single_offsets.append(increments(singles))
    return banks, held_out, offsets, single_offsets


def refined_settings(deltas: list[ConceptDelta], settings: PairSettings) -> dict:
    """The ``pair_terms`` record after ``settings.rounds`` more rounds on the terms ``deltas`` carry.

    Raises:
        ValueError: a pair without a term fitted against its partner's current increments, deltas whose terms
            were fitted in different runs, or refinement settings other than those of earlier refinements.
    """
    hashes = [increment_hash(delta) for delta in deltas]
    for i, j in itertools.permutations(range(len(deltas)), 2):
        first, second = deltas[i], deltas[j]
        if stored_term(first, second, hashes[j]) is None:
            raise ValueError(
                f"Refining needs every pair's term: the delta of {partner_key(first)} has none fitted against the "
                f"delta of {partner_key(second)}. Fit them first (train_pair_interactions without refine)."
            )
    records = {json.dumps(delta.hyperparameters.get("pair_terms"), sort_keys=True) for delta in deltas}
    if len(records) != 1:
        raise ValueError("The deltas' pair terms come from different runs: fit them again together, without refine.")
    previous = json.loads(records.pop())
    refinement = {
        key: getattr(settings, key) for key in ("refine_steps", "refine_learning_rate", "refine_trajectories")
    }
    earlier = previous.get("rounds", 1)
    if earlier > 1 and any(previous.get(key) != value for key, value in refinement.items()):
        raise ValueError(f"Earlier rounds were refined with {previous}; refine again with the same refine_* settings.")
    return previous | refinement | {"rounds": earlier + settings.rounds}


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


@torch.no_grad()
def pair_target(
    frozen: D3PMUNet, x_t: torch.Tensor, timesteps: torch.Tensor, digits: list[int], target_settings: dict
) -> torch.Tensor:
    """The null label's target logits ``(B, K, H, W)`` with ``digits`` erased, from the frozen model at x_t."""
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
    if len(deltas) < 2 or any(delta.method != "separable" or len(delta.concepts) != 1 for delta in deltas):
        raise ValueError("Pair terms need two or more single-digit 'separable' deltas (trained with --jointly).")
    if len(found) != 1:
        raise ValueError(f"The deltas were trained to different null-label targets ({sorted(found)}): retrain jointly.")
    return json.loads(found.pop())


def corrections_model(frozen: D3PMUNet, names: list[str], increments: list[dict[str, torch.Tensor]]):
    """A `ConceptIncrements` over ``frozen`` holding the trained ``increments`` (one group per pair)."""
    model = ConceptIncrements(frozen, names, len(increments))
    with torch.no_grad():
        for group, trained in zip(model.increments, increments, strict=True):
            for parameter, name in zip(group, names, strict=True):
                parameter.copy_(trained[name])
    return model


@torch.no_grad()
def held_out_kl(model, losses, held_out) -> list[list[float]]:
    """Each pair's held-out KL under each of ``losses`` (``loss(model, pair, x_t, t)``): ``[[...], ...]``."""
    device = model.unet.device
    return [
        [round(loss(model, index, x_t.to(device), t.to(device)).item(), 5) for loss in losses]
        for index, (x_t, t) in enumerate(held_out)
    ]


def without_terms(delta: ConceptDelta) -> ConceptDelta:
    """The delta's single increments and metadata, without pair terms."""
    metadata = {key: value for key, value in delta.metadata.items() if key != "interactions"}
    return ConceptDelta(tensors=dict(delta.tensors), metadata=metadata)


def with_terms(
    delta: ConceptDelta,
    terms: dict[str, dict[str, torch.Tensor]],
    deltas: list[ConceptDelta],
    recorded: dict,
    kl: dict[str, list[float]],
) -> ConceptDelta:
    """A copy of ``delta`` carrying its pair terms, its partners' hashes, the settings and its pairs' KL."""
    partners = {partner_key(other): increment_hash(other) for other in deltas if other is not delta}
    own = partner_key(delta)
    metrics = delta.metrics | {"pair_kl": {key: value for key, value in kl.items() if own in key.split("+")}}
    metadata = delta.metadata | {
        "format_version": str(FORMAT_VERSION),
        "interactions": json.dumps(partners, sort_keys=True),
        "hyperparameters": json.dumps(delta.hyperparameters | {"pair_terms": recorded}, sort_keys=True, default=str),
        "metrics": json.dumps(metrics, sort_keys=True),
    }
    return ConceptDelta(tensors=dict(delta.tensors), metadata=metadata, interactions=terms)
