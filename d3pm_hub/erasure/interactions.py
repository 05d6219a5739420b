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
  with both singles applied): where it goes wrong, rather than on noised real digits (`~.on_policy`). Later
  rounds (DAgger-style, ``PairSettings.rounds``, or ``refine=True`` on deltas that carry terms) redraw those
  states with the term in place, where the sampler then goes, and fit a correction on top; ``pairs=[...]``
  restricts such rounds to the pairs that need them, with their own target β, budget and window of timesteps.
  ``complete=True`` fits only the pairs whose term no longer applies (a single changed by
  `~.on_policy.refine_singles`), replaying every recorded round;
* storage — Δ_ab changes nothing but the null label's n tokens' keys/values, so each file stores those changes
  M_ab ``(out, n)`` per edited ``attn2.to_k/to_v`` (a few KB per partner; ΔW = M_ab R_∅ with R_∅ the null
  tokens' dual rows, `~.anchors.context_token_rows`) under ``interaction/{partner}/{parameter}``, in both partners'
  files, with the content hash of the partner delta it was fitted against (``metadata["interactions"]``);
  an image-path term (below) is stored once, in the file of the partner whose digits come first (`pair_term`
  reads a pair's term from both files);
* composition — `interaction_corrections` adds s_a s_b Δ_ab for every pair of composed deltas that name each
  other with matching hashes. The term is bilinear in the strengths: dropping either delta removes it, so removal
  stays exact and restoring a digit leaves the other's single delta.

Triples and larger sets get every pair term among them (the expansion truncated at second order).

Where the null label's keys/values cannot express a pair's target (7+8: a further round lowers the KL but not the
rate of 8), a targeted round may edit the image path instead (``refine_parameters="full"``: every UNet weight but
the label path, undecoupled). Such a term is stored as low-rank factors, ``{name}:up`` ``(out, r)`` and
``{name}:down`` ``(r, in·k·k)`` (a vector as ``(out, 1)`` and ``(1, 1)``), fitted at rank r (each step's increment
projected onto its top r singular directions, `low_rank_factors`). It stays bilinear in the strengths, so the
singles and removal stay exact, but while both deltas are composed it moves the other labels' outputs slightly too
(BENCHMARKS.md §4 measures how much).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
from dataclasses import dataclass

import torch

from ..deltas import FORMAT_VERSION, ConceptDelta
from ..pipeline import D3PMPipeline
from ..unet import D3PMUNet
from .anchors import context_token_rows
from .common import NEGATIVE_GUIDANCE, frozen_copy, low_rank_factors
from .on_policy import RoundSettings, fit_corrections, null_target_settings, without_pair_terms

logger = logging.getLogger(__name__)

UP, DOWN = ":up", ":down"  # suffixes of an image-path term's factors: ΔW = (up @ down).reshape(W.shape)


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
        refine_timesteps: ``[lo, hi]``: those rounds fit only the states with lo ≤ t ≤ hi (None: all). Where a
            pair's samples go wrong can be narrow: 2+6's null label sampled from its exact target at the five
            default steps with 358 ≤ t ≤ 643 and from the deltas elsewhere lets 2 back in 0.5% of samples, as the
            exact target at every step does, against 5.0% from the deltas alone (`erasure_exact_steps.py`).
        null_alpha: β of the pairs' null-label target (guidance away from the pair's mixture,
            `~.posterior.null_label_target`) in this run's rounds; None: the singles' β. A pair may need more
            than a single: sampled exactly, the mixture at the singles' β = 2 lets 7 back in 4% of 0+7's null
            samples. The record keeps each round's β (``null_alphas``), so refining can change it.
        null_combine: how the targeted rounds' target guides away from the pair (`~.posterior.null_label_target`):
            ``"mixture"`` (every round of all pairs) or ``"sum"``, for a pair whose mixture target itself lets a
            digit back: sampled exactly, 6+7's lets 6 back in 3.5% of null samples at β = 2 and 2.0% at β = 3 or 4,
            the sum at β = 2 in 0.25% (`benchmarks/erasure_targets.py`). Only with ``pairs``; recorded per round.
        null_weights: with the sum, a multiplier of β per digit (``{"4": 0.5}``; unlisted digits 1): a pair
            whose sum target lets one digit back because pushing from the other sends samples to it. Only with
            ``pairs``; recorded per round.
        refine_parameters: what the targeted rounds edit: ``"context"`` (the null label's keys/values) or
            ``"full"`` (every UNet weight but the label path, kept as a rank-``refine_rank`` term; module
            docstring). Only with ``pairs``; recorded per round.
        refine_rank: rank of each weight's term in ``"full"`` rounds.
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
    refine_timesteps: list[int] | None = None
    null_alpha: float | None = None
    null_combine: str = "mixture"
    null_weights: dict[str, float] | None = None
    refine_parameters: str = "context"
    refine_rank: int = 16


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


def pair_term(
    first: ConceptDelta, second: ConceptDelta, first_hash: str, second_hash: str
) -> dict[str, torch.Tensor] | None:
    """The pair term of ``first`` and ``second`` as their files store it: the entries either file holds for the
    other, fitted against its current increments (`stored_term`; hashes by `increment_hash`), else None.

    Both files hold the null-label changes (equal when written together); an image-path term's factors sit in one
    file only (`split_term`).
    """
    found = [stored_term(first, second, second_hash), stored_term(second, first, first_hash)]
    terms = [term for term in found if term is not None]
    return {key: value for term in reversed(terms) for key, value in term.items()} if terms else None


def split_term(
    terms: list[dict[str, dict[str, torch.Tensor]]], deltas: list[ConceptDelta], i: int, j: int, term: dict
) -> None:
    """Store pair (i, j)'s ``term`` in ``terms`` (each delta's terms by partner): the null-label changes in both
    files, an image-path term's factors only in the file of the partner whose digits come first (they are the
    bulk of the term: ~300 K values per pair at rank 8)."""
    holder = min(i, j, key=lambda k: deltas[k].concepts)
    shared = {key: value for key, value in term.items() if not key.endswith((UP, DOWN))} or term
    terms[i][partner_key(deltas[j])] = term if holder == i else shared
    terms[j][partner_key(deltas[i])] = term if holder == j else shared


def interaction_corrections(
    base_parameters: dict[str, torch.Tensor], deltas: list[tuple[ConceptDelta, float]]
) -> dict[str, torch.Tensor]:
    """Σ_{pairs} s_a s_b Δ_ab for the composed deltas whose pair terms name each other (module docstring).

    A term is read from both partners' files (`pair_term`) and applied once.

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
        term = pair_term(first, second, hashes[id(first)], hashes[id(second)])
        if term is None or not s_first * s_second:
            continue
        if rows is None:
            rows = context_token_rows(base_parameters)[1][-1]  # (n, D): the null label's dual rows
        for key in sorted(term):
            if key.endswith(DOWN):
                continue  # applied with its ":up" factor
            name = key.removesuffix(UP)
            increment = (s_first * s_second * term_increment(base_parameters, key, term, rows)).to(
                base_parameters[name].dtype
            )
            corrections[name] = corrections.get(name, 0) + increment
    return corrections


def term_increment(
    base_parameters: dict[str, torch.Tensor], key: str, term: dict[str, torch.Tensor], rows: torch.Tensor
) -> torch.Tensor:
    """The weight increment ΔW (float64, the weight's shape) of one entry of a pair term: a null-token change
    ``(out, n)`` times the null tokens' dual rows ``rows`` ``(n, D)``, or an image-path term's ``key`` (``:up``)
    factor times its ``:down`` factor.

    Raises:
        ValueError: a weight the model lacks, or a change or factors whose shapes do not fit it.
    """
    name = key.removesuffix(UP)
    if name not in base_parameters:
        raise ValueError(f"A pair interaction term edits {name!r}, which this model does not have.")
    shape = base_parameters[name].shape
    if key.endswith(UP):
        up, down = term[key], term.get(name + DOWN, torch.zeros(0))
        expected = (shape[0], up.shape[-1]), (up.shape[-1], math.prod(shape[1:]))
        if (tuple(up.shape), tuple(down.shape)) != expected:
            raise ValueError(
                f"A pair interaction term for {name!r} has factors of shapes {tuple(up.shape)} and "
                f"{tuple(down.shape)}, expected {expected[0]} and {expected[1]}."
            )
        return (up.double() @ down.double()).reshape(shape)
    expected = (shape[0], rows.shape[0])
    if tuple(term[key].shape) != expected:
        raise ValueError(
            f"A pair interaction term for {name!r} has shape {tuple(term[key].shape)}, expected {expected}."
        )
    return term[key].double() @ rows.double()


def train_pair_interactions(
    pipeline: D3PMPipeline,
    deltas: list[ConceptDelta],
    refine: bool = False,
    complete: bool = False,
    pairs: list[str] | None = None,
    **settings,
) -> tuple[list[ConceptDelta], dict[str, list[float]]]:
    """Fit a pair term for every pair of ``deltas`` (jointly trained `separable` singles) and store it in both.

    Each round fits each pair's term on the states x_t that null-label samples with both singles (and the pair's
    term so far) applied pass through, to the frozen model's target there (`~.on_policy.fit_corrections`): round 1
    from no term, round r ≥ 2 a correction added to the term of round r − 1.

    Args:
        pipeline: the base pipeline the deltas were made for (not modified).
        deltas: single-digit `separable` deltas with the same null-label target settings.
        refine: keep the pair terms the deltas carry (all pairs, fitted together with `train_pair_interactions`)
            and run ``rounds`` more rounds on top of them; otherwise terms they carry are replaced.
        complete: keep the terms that still apply and fit only the pairs without one (after
            `~.on_policy.refine_singles` changed a single), replaying every recorded round (targeted ones
            included, in order) with its settings; each round's steps scale with the share of pairs fitted.
        pairs: with ``refine``, only these pairs (``"0+7"``) run the ``rounds`` more rounds, with this call's
            ``null_alpha`` and ``refine_*`` settings: a pair that needs a stronger target or a larger budget gets
            it without moving the others. Each such round is recorded in ``pair_terms["targeted"]``.
        settings: `PairSettings` fields (with ``refine``, the first round's fields are those the terms record and
            ``null_alpha`` may differ from the earlier rounds'; with ``complete``, all of them are recorded, each
            round's target β included).

    Returns: copies of the deltas with their pair terms, and the held-out KL of each fitted pair's null label to
    its target without and with its term, on its last round's states (``{"a+b": [without, with]}``; also stored in
    each delta's metrics).

    Raises:
        ValueError: deltas that cannot be paired, or (``refine``, ``complete``, ``pairs``) deltas whose terms do
            not allow it.
    """
    if refine and complete:
        raise ValueError("refine adds rounds to every pair's term and complete fits the missing ones: choose one.")
    if pairs is not None and not refine:
        raise ValueError("pairs chooses the pair terms that refine adds rounds to: pass refine=True (--refine) too.")
    settings = PairSettings(**settings)
    if settings.null_combine not in NEGATIVE_GUIDANCE or (settings.null_combine != "mixture" and pairs is None):
        raise ValueError(
            f"null_combine must be 'mixture', or 'sum' for targeted rounds of chosen pairs (--refine --pairs), "
            f"got {settings.null_combine!r}."
        )
    check_null_weights(settings, deltas, pairs)
    if settings.refine_parameters not in ("context", "full") or (settings.refine_parameters != "context" and not pairs):
        raise ValueError(
            f"refine_parameters must be 'context', or 'full' for targeted rounds of chosen pairs (--refine --pairs), "
            f"got {settings.refine_parameters!r}."
        )
    if settings.refine_rank < 1:
        raise ValueError(f"refine_rank must be at least 1, got {settings.refine_rank}.")
    target_settings = null_target_settings(deltas)
    if len(deltas) < 2:
        raise ValueError("Pair terms need two or more single-digit 'separable' deltas (trained with --jointly).")
    every = list(itertools.combinations(range(len(deltas)), 2))
    alpha = float(target_settings["beta"] if settings.null_alpha is None else settings.null_alpha)
    if refine or complete:
        recorded = shared_record(deltas) if complete else refined_settings(deltas, settings, alpha, pairs)
    else:
        recorded = dataclasses.asdict(settings) | {"null_alphas": [alpha] * settings.rounds, "seconds": 0.0}
        for key in ("null_alpha", "null_weights", "refine_parameters", "refine_rank"):
            del recorded[key]  # each round's β is in null_alphas; targeted rounds record what they edit
        deltas = [without_pair_terms(delta) for delta in deltas]
    schedule = recorded_rounds(recorded, target_settings)
    if complete:
        hashes = {partner_key(delta): increment_hash(delta) for delta in deltas}
        kept = current_terms(deltas)
        deltas = [with_interactions(delta, terms, hashes) for delta, terms in zip(deltas, kept, strict=True)]
        every = [(i, j) for i, j in every if partner_key(deltas[j]) not in deltas[i].interactions]
    elif refine:
        schedule = schedule[-settings.rounds :]
    fields = {field.name for field in dataclasses.fields(PairSettings)}
    settings = PairSettings(**{key: value for key, value in recorded.items() if key in fields})
    kl: dict[str, list[float]] = {}
    frozen = frozen_copy(pipeline)
    for plan in schedule:
        chosen = [pair for pair in every if plan["pairs"] is None or pair_name(deltas, pair) in plan["pairs"]]
        if not chosen:
            continue
        terms, fitted, seconds = fit_pair_round(pipeline, frozen, deltas, chosen, settings, plan, target_settings)
        kl |= fitted
        recorded["seconds"] = round(recorded["seconds"] + seconds, 2)
        deltas = [with_terms(delta, terms[i], deltas, recorded, kl) for i, delta in enumerate(deltas)]
    return deltas, kl


def check_null_weights(settings: PairSettings, deltas: list[ConceptDelta], pairs: list[str] | None) -> None:
    """Refuse ``null_weights`` outside a targeted sum round, for digits not among ``deltas``, or not positive."""
    if not settings.null_weights:
        return
    if settings.null_combine != "sum" or pairs is None:
        raise ValueError("null_weights weight the sum target of targeted rounds: pass null_combine=sum and --pairs.")
    known = {partner_key(delta) for delta in deltas}
    for digit, weight in settings.null_weights.items():
        if str(digit) not in known or not (isinstance(weight, int | float) and 0 < weight < math.inf):
            raise ValueError(
                f"null_weights maps digits of these deltas ({', '.join(sorted(known))}) to positive numbers, "
                f"got {digit!r}: {weight!r}."
            )


def pair_name(deltas: list[ConceptDelta], pair: tuple[int, int]) -> str:
    """How a pair of ``deltas`` is named in records and metrics: its partner keys, sorted, joined by '+'."""
    return "+".join(sorted(partner_key(deltas[index]) for index in pair))


def recorded_rounds(record: dict, target_settings: dict) -> list[dict]:
    """Every round a ``pair_terms`` record describes, in the order they ran: the rounds of all pairs, each
    followed by the targeted rounds run after it. Each plan holds the round's ``steps`` (for all pairs; a round
    runs its share), ``learning_rate``, ``trajectories``, ``seed``, target ``null_alpha`` and ``pairs`` (None: all).
    """
    alphas = round_alphas(record, target_settings)
    schedule = []
    for round_index in range(1, record.get("rounds", 1) + 1):
        prefix = "" if round_index == 1 else "refine_"
        plan = {key: record[prefix + key] for key in ("steps", "learning_rate", "trajectories")}
        plan["timesteps"] = record.get("refine_timesteps") if prefix else None
        schedule.append(
            plan | {"seed": record["seed"] + round_index - 1, "null_alpha": alphas[round_index - 1], "pairs": None}
        )
        schedule += [entry for entry in record.get("targeted", []) if entry["after_round"] == round_index]
    return schedule


def fit_pair_round(
    pipeline: D3PMPipeline,
    frozen: D3PMUNet,
    deltas: list[ConceptDelta],
    pairs: list[tuple[int, int]],
    settings: PairSettings,
    plan: dict,
    target_settings: dict,
) -> tuple[list[dict[str, dict[str, torch.Tensor]]], dict[str, list[float]], float]:
    """One on-policy round (a `recorded_rounds` plan): each of ``pairs``' terms plus a correction fitted on the
    states its composition visits, to the pair's target at the plan's β, on the plan's ``parameters`` (the null
    label's keys/values by default; ``"full"``: the image path, kept at the plan's ``rank``).

    The round runs the plan's steps times the share of all pairs that ``pairs`` are (as many per pair).

    Returns: each delta's terms by partner (the ``(out, n)`` changes of the null tokens' keys/values), each fitted
    pair's held-out KL ``[without term, with term]``, and the optimisation's seconds.
    """
    round_settings = RoundSettings(
        steps=max(1, round(plan["steps"] * len(pairs) / math.comb(len(deltas), 2))),
        learning_rate=plan["learning_rate"],
        trajectories=plan["trajectories"],
        batch_size=settings.batch_size,
        lr_schedule=settings.lr_schedule,
        eval_trajectories=settings.eval_trajectories,
        seed=plan["seed"],
        timesteps=plan.get("timesteps"),
    )
    logger.info("pair terms: a round of %d pairs at β = %s", len(pairs), plan["null_alpha"])
    compositions = [[deltas[i], deltas[j]] for i, j in pairs]
    references = [[without_pair_terms(deltas[i]), without_pair_terms(deltas[j])] for i, j in pairs]
    target = target_settings | {
        "beta": plan["null_alpha"],
        "combine": plan.get("null_combine", "mixture"),
        "digit_weights": plan.get("null_weights"),
    }
    edited, rank = plan.get("parameters", "context"), plan.get("rank")
    corrections, kl, seconds = fit_corrections(
        pipeline, frozen, compositions, references, round_settings, target, edited, edited == "context", rank
    )
    terms = added_terms(frozen, deltas, pairs, corrections, rank)
    return terms, {pair_name(deltas, pair): value for pair, value in zip(pairs, kl, strict=True)}, seconds


def added_terms(
    frozen: D3PMUNet,
    deltas: list[ConceptDelta],
    pairs: list[tuple[int, int]],
    corrections: list[dict[str, torch.Tensor]],
    rank: int | None = None,
) -> list[dict[str, dict[str, torch.Tensor]]]:
    """Each delta's pair terms by partner: the terms it carries, with each fitted pair's correction ΔW added as
    the change ΔW T_∅ᵀ ``(out, n)`` of the null tokens' keys/values (T_∅ ``(n, D)`` their context), or with
    ``rank`` (an image-path round) as the rank-``rank`` factors of ΔW plus the pair's image-path term so far."""
    null_tokens = context_token_rows(dict(frozen.named_parameters()))[0][-1].cpu()  # (n, D)
    terms = [dict(delta.interactions) for delta in deltas]
    hashes = [increment_hash(delta) for delta in deltas]
    for (i, j), increments in zip(pairs, corrections, strict=True):
        changes = dict(pair_term(deltas[i], deltas[j], hashes[i], hashes[j]) or {})
        for name, value in increments.items():
            if rank is None:
                changes[name] = (
                    changes.get(name, torch.zeros(())).float() + (value.cpu().double() @ null_tokens.T).float()
                )
                continue
            total = value.cpu().double()
            if name + UP in changes:
                total = total + (changes[name + UP].double() @ changes[name + DOWN].double()).reshape(value.shape)
            changes[name + UP], changes[name + DOWN] = low_rank_factors(total, rank)
        split_term(terms, deltas, i, j, changes)
    return terms


def current_terms(deltas: list[ConceptDelta]) -> list[dict[str, dict[str, torch.Tensor]]]:
    """Each delta's pair terms that still apply (stored by either partner and fitted against the other's current
    increments), by partner; stale terms are left out."""
    hashes = [increment_hash(delta) for delta in deltas]
    terms: list[dict[str, dict[str, torch.Tensor]]] = [{} for _ in deltas]
    for i, j in itertools.combinations(range(len(deltas)), 2):
        found = pair_term(deltas[i], deltas[j], hashes[i], hashes[j])
        if found is not None:
            split_term(terms, deltas, i, j, found)
    return terms


def shared_record(deltas: list[ConceptDelta]) -> dict:
    """The ``pair_terms`` record the deltas share (the run their terms were fitted in).

    Raises:
        ValueError: deltas without a record, or with records of different runs.
    """
    records = {json.dumps(delta.hyperparameters.get("pair_terms"), sort_keys=True) for delta in deltas}
    if len(records) != 1 or records == {"null"}:
        raise ValueError(
            "Refining and completing need deltas whose pair terms come from one run of train_pair_interactions: "
            "fit them all again together, without refine or complete."
        )
    return json.loads(records.pop())


def refined_settings(
    deltas: list[ConceptDelta], settings: PairSettings, alpha: float, pairs: list[str] | None = None
) -> dict:
    """The ``pair_terms`` record after ``settings.rounds`` more rounds, to the target of β = ``alpha``, on the terms
    ``deltas`` carry: rounds of all pairs, or targeted rounds of ``pairs`` only (``"0+7"``; recorded with their own
    ``refine_*`` settings under ``targeted``).

    Raises:
        ValueError: a pair without a term fitted against its partner's current increments, deltas whose terms
            were fitted in different runs, refinement settings of all pairs other than those of earlier
            refinements, or ``pairs`` that name no pair of ``deltas``.
    """
    hashes = [increment_hash(delta) for delta in deltas]
    for i, j in itertools.permutations(range(len(deltas)), 2):
        first, second = deltas[i], deltas[j]
        if stored_term(first, second, hashes[j]) is None:
            raise ValueError(
                f"Refining needs every pair's term: the delta of {partner_key(first)} has none fitted against the "
                f"delta of {partner_key(second)}. Fit the missing ones first (train_pair_interactions with complete)."
            )
    if settings.rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {settings.rounds}.")
    previous = shared_record(deltas)
    refinement = {
        key: getattr(settings, key)
        for key in ("refine_steps", "refine_learning_rate", "refine_trajectories", "refine_timesteps")
    }
    earlier = previous.get("rounds", 1)
    if pairs is not None:
        targeted = refinement | {"null_combine": settings.null_combine}
        if settings.null_weights:
            targeted |= {"null_weights": settings.null_weights}
        if settings.refine_parameters != "context":
            targeted |= {"parameters": settings.refine_parameters, "rank": settings.refine_rank}
        return previous | {"targeted": targeted_rounds(deltas, previous, targeted, alpha, pairs, settings.rounds)}
    if earlier > 1 and any(previous.get(key) != value for key, value in refinement.items()):
        raise ValueError(f"Earlier rounds were refined with {previous}; refine again with the same refine_* settings.")
    alphas = round_alphas(previous, null_target_settings(deltas)) + [alpha] * settings.rounds
    return previous | refinement | {"rounds": earlier + settings.rounds, "null_alphas": alphas}


def targeted_rounds(
    deltas: list[ConceptDelta], record: dict, refinement: dict, alpha: float, pairs: list[str], rounds: int
) -> list[dict]:
    """The record's targeted rounds with ``rounds`` more of ``pairs`` (`recorded_rounds` plans, run after the
    record's last round of all pairs; seeds continue from the record's last round).

    Raises:
        ValueError: ``pairs`` empty or naming no pair of ``deltas``.
    """
    names = {pair_name(deltas, pair) for pair in itertools.combinations(range(len(deltas)), 2)}
    chosen = sorted({"+".join(sorted(text.split("+"))) for text in pairs})
    unknown = [text for text in chosen if text not in names]
    if not chosen or unknown:
        raise ValueError(f"pairs must name pairs of these deltas ({', '.join(sorted(names))}); got {pairs}.")
    earlier = record.get("targeted", [])
    last = record.get("rounds", 1)
    plan = {key.removeprefix("refine_"): value for key, value in refinement.items()}
    seeds = range(record["seed"] + last + len(earlier), record["seed"] + last + len(earlier) + rounds)
    added = [plan | {"seed": seed, "null_alpha": alpha, "pairs": chosen, "after_round": last} for seed in seeds]
    return earlier + added


def round_alphas(record: dict, target_settings: dict) -> list[float]:
    """Each recorded round's pair-target β (records written before ``null_alphas`` used the singles' β)."""
    return record.get("null_alphas") or [target_settings["beta"]] * record.get("rounds", 1)


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
    own_kl = {key: value for key, value in kl.items() if own in key.split("+")}
    metrics = delta.metrics | {"pair_kl": delta.metrics.get("pair_kl", {}) | own_kl}
    metadata = delta.metadata | {
        "format_version": str(FORMAT_VERSION),
        "interactions": json.dumps(partners, sort_keys=True),
        "hyperparameters": json.dumps(delta.hyperparameters | {"pair_terms": recorded}, sort_keys=True, default=str),
        "metrics": json.dumps(metrics, sort_keys=True),
    }
    return ConceptDelta(tensors=dict(delta.tensors), metadata=metadata, interactions=terms)


def with_interactions(
    delta: ConceptDelta, terms: dict[str, dict[str, torch.Tensor]], hashes: dict[str, str]
) -> ConceptDelta:
    """A copy of ``delta`` carrying ``terms`` (partner → parameter → change), recorded as fitted against the
    partners' content hashes ``hashes`` (partner → `increment_hash`)."""
    metadata = {key: value for key, value in delta.metadata.items() if key != "interactions"}
    if terms:
        metadata["interactions"] = json.dumps({partner: hashes[partner] for partner in terms}, sort_keys=True)
    return ConceptDelta(tensors=dict(delta.tensors), metadata=metadata, interactions=terms)
