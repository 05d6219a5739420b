"""Separable erasure that also reaches the unconditional model: a decoupled edit of the erased label and the null label.

Mapping the erased label e onto the null label (closed form) cannot push e's rate below the unconditional model's
own rate of e (≈ 10%), and negative guidance of e alone (ESD, SepME) leaves the null label drawing e as before.
This method edits both labels' keys and values in every ``attn2.to_k/to_v``, and nothing else:

* **null label** — the frozen model's negatively guided unconditional distribution

      p*(x0 | x_t) = softmax(z_∅ − β Σₑ (z_e − z_∅))                       (β = ``null_alpha``)

  is distilled into the null label's keys and values (KL(p* ‖ p_θ(· | x_t, ∅)) on x_t from real digits of every
  class): the sampler's own "negative prompt", built into the weights;
* **erased label** — mapped in closed form onto an anchor digit's keys and values (``anchor="auto"``, the
  default: the digit `~d3pm_hub.erasure.anchors.rank_anchors` finds least able to draw e), so label e draws
  clean digits of the anchor at the base model's confidence, as Concept Ablation anchors a concept. The ranked
  anchors are stored in the delta: when a composition also erases the anchor, label e moves to the next one
  (`~d3pm_hub.erasure.anchors.anchor_corrections`). With ``anchor=None`` label e is trained to the null label's
  target instead (it draws what the edited null label draws, at unconditional quality).

Weight decoupling (as in SepME): every increment ΔW is projected onto the null space of the other digits' tokens
and the shared tokens (ΔW p = 0), so every other label keeps its keys and values exactly; each digit's increment
touches only its own tokens and the null label's. Deltas therefore compose by addition; their null label edits
add in key/value space (approximately the sum of the negative guidance terms — the pair matrix measures how well).
"""

from __future__ import annotations

import torch

from ..deltas import ConceptDelta
from ..pipeline import D3PMPipeline
from .anchors import rank_anchors
from .closed_form import erase_closed_form
from .common import DigitSampler, check_digits, frozen_copy, logit_divergence, optimise_increment, select_parameters
from .sepme import decoupling_projector


def erase_separable(
    pipeline: D3PMPipeline,
    digits: list[int],
    null_alpha: float = 1.0,
    anchor: int | str | None = "auto",
    steps: int = 100,
    learning_rate: float = 3e-3,
    batch_size: int = 16,
    null_keys: bool = True,
    seed: int = 0,
    base_model: str = "",
) -> ConceptDelta:
    """Map the erased labels onto anchors and distil negative guidance into the null label — see above.

    Args:
        pipeline: the trained base pipeline (not modified).
        digits: labels to erase.
        null_alpha: β of the target softmax(z_∅ − β Σₑ (z_e − z_∅)).
        anchor: ``"auto"`` (each erased label takes the keys and values of its best-ranked anchor, closed form),
            a digit (that digit first, then the ranked others), or None (erased labels learn the null target).
        steps, learning_rate, batch_size: Adam on x_t from real images of every digit.
        null_keys: train the null label's keys as well as its values (False: values only).
        seed: seed of batches, timesteps and noise.
        base_model: where the base came from (recorded in the metadata).
    """
    unet = pipeline.unet
    digits = check_digits(unet, digits)
    frozen = frozen_copy(pipeline)
    null = frozen.null_label
    anchors = None if anchor is None else choose_anchors(frozen, pipeline.scheduler, digits, anchor, seed)
    trained_labels = [null] if anchor is not None else [*digits, null]
    projector = decoupling_projector(frozen, trained_labels).to(frozen.device)
    everything = DigitSampler.for_digits(pipeline.scheduler, list(range(null)))
    device = frozen.device

    def loss_fn(model, generator: torch.Generator) -> dict[str, torch.Tensor]:
        _, x_t, timesteps, _ = everything.draw(pipeline.scheduler, batch_size, generator, device)
        labels = [null, *digits]
        with torch.no_grad():
            outputs = frozen(
                x_t.repeat(len(labels), 1, 1, 1),
                timesteps.repeat(len(labels)),
                torch.tensor(labels, device=device).repeat_interleave(batch_size),
            ).chunk(len(labels))
            unconditional = outputs[0]
            target = unconditional - null_alpha * sum(z - unconditional for z in outputs[1:])
        count = len(trained_labels)
        predicted = model(
            x_t.repeat(count, 1, 1, 1),
            timesteps.repeat(count),
            torch.tensor(trained_labels, device=device).repeat_interleave(batch_size),
        )
        loss = logit_divergence(predicted, target.repeat(count, 1, 1, 1), "kl")
        return {"loss": loss, "concept": loss}

    result = optimise_increment(
        frozen,
        [name for name in select_parameters(frozen, "context") if null_keys or ".to_v." in name],
        loss_fn,
        steps,
        learning_rate,
        project=lambda name, increment: (increment.double() @ projector).to(increment.dtype),
        seed=seed,
    )
    increments = result.increments
    for digit, ranked in (anchors or {}).items():
        mapped = erase_closed_form(pipeline, [digit], target_label=ranked[0])
        increments = {name: increments.get(name, 0) + value for name, value in mapped.tensors.items()}
    hyperparameters = dict(
        null_alpha=null_alpha,
        anchor=anchor,
        anchors=anchors,
        steps=steps,
        learning_rate=learning_rate,
        batch_size=batch_size,
        null_keys=null_keys,
        seed=seed,
    )
    metrics = {"erase_seconds": round(result.seconds, 2), "final_loss": result.history[-1]["loss"]}
    return ConceptDelta.create(frozen, increments, digits, "separable", hyperparameters, base_model, metrics)


def choose_anchors(unet, scheduler, digits: list[int], anchor: int | str, seed: int = 0) -> dict[int, list[int]]:
    """Ranked anchors per erased digit: `rank_anchors` order, with a given ``anchor`` digit moved first."""
    if anchor != "auto" and (
        isinstance(anchor, str) or not 0 <= int(anchor) < unet.null_label or int(anchor) in digits
    ):
        raise ValueError(
            f"anchor must be 'auto', None or a digit in 0..{unet.null_label - 1} that is not erased, got {anchor!r}."
        )
    anchors = {}
    for digit in digits:
        ranked = rank_anchors(unet, scheduler, digit, excluded=tuple(digits), seed=seed)
        if anchor != "auto":
            ranked = [int(anchor)] + [a for a in ranked if a != int(anchor)]
        anchors[digit] = ranked
    return anchors
