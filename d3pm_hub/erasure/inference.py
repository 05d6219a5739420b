"""Inference-time erasure (no weights change): label switching and negative guidance, as a reference point.

`InferenceTimeErasurePipeline` is a `D3PMPipeline` whose guided x0 log-probabilities

* **switch** the erased labels to the null label (an erased digit is then drawn like an unconditional sample),
* and, with ``negative_scale`` s⁻ > 0, subtract the erased digits' guidance direction from every sample
  (negative prompting / safe guidance on x0 distributions):

      log p ← log p − s⁻ Σₑ (log p(x0 | x_t, e) − log p(x0 | x_t, ∅)),   renormalised over the K levels,

  or, with ``combine="mixture"``, the direction of their mixture (1/|S|) Σₑ p(x0 | x_t, e). With the sum,
  ``weights`` multiply each digit's term (s⁻ Σₑ wₑ (…)).

It is a filter on the sampler: the weights still hold the digit (and anyone with the weights can skip it).
Its artefact is therefore not a delta but a small JSON *erasure config* (`save_erasure` / `load_erasure`: digits,
negative scale, the base model's identity), which ``training/erase.py --method inference-switch|inference-negative``
writes.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..deltas import base_model_hash
from ..paths import atomic_write_text
from ..pipeline import D3PMPipeline
from .common import NEGATIVE_GUIDANCE, check_digits, guide_away

ERASURE_CONFIG_VERSION = 1
# Method name → default negative guidance scale s⁻.
INFERENCE_METHODS = {"inference-switch": 0.0, "inference-negative": 1.0}


class InferenceTimeErasurePipeline(D3PMPipeline):
    """A pipeline that never samples the erased digits' labels and guides away from them.

    Build it with `InferenceTimeErasurePipeline.wrap`; sampling is `D3PMPipeline.__call__` unchanged.
    """

    erased_digits: tuple[int, ...] = ()
    negative_scale: float = 0.0
    combine: str = "sum"
    weights: list[float] | None = None

    @classmethod
    def wrap(
        cls,
        pipeline: D3PMPipeline,
        digits: list[int],
        negative_scale: float = 0.0,
        combine: str = "sum",
        weights: list[float] | None = None,
    ):
        """The same UNet and scheduler (shared, not copied) with ``digits`` erased at sampling time.

        ``combine``: how several digits' guidance terms combine, ``weights``: the sum's weight per digit of
        ``digits`` (`~d3pm_hub.erasure.common.guide_away`).
        """
        if negative_scale < 0:
            raise ValueError(f"negative_scale must be ≥ 0, got {negative_scale}.")
        if combine not in NEGATIVE_GUIDANCE:
            raise ValueError(f"combine must be one of {NEGATIVE_GUIDANCE}, got {combine!r}.")
        wrapped = cls(unet=pipeline.unet, scheduler=pipeline.scheduler)
        wrapped.erased_digits = tuple(check_digits(pipeline.unet, digits))
        wrapped.negative_scale = float(negative_scale)
        wrapped.combine = combine
        if weights is not None:
            if combine != "sum" or len(weights) != len(digits) or min(weights) <= 0:
                raise ValueError(f"weights need combine='sum' and one positive weight per digit, got {weights}.")
            wrapped.weights = [float(weight) for weight in weights]
        return wrapped

    @property
    def method(self) -> str:
        return "inference-negative" if self.negative_scale else "inference-switch"

    @property
    def concepts(self) -> list[int]:
        """The erased digits (as `~d3pm_hub.deltas.ConceptDelta.concepts`)."""
        return list(self.erased_digits)

    def save_erasure(self, path: str | Path, base_model: str = "") -> Path:
        """Write this erasure as JSON (digits, negative scale, base model hash), atomically (temp file + rename)."""
        config = {
            "format_version": ERASURE_CONFIG_VERSION,
            "method": self.method,
            "concepts": self.concepts,
            "negative_scale": self.negative_scale,
            "combine": self.combine,
            "weights": self.weights,
            "base_model_hash": base_model_hash(self.unet),
            "base_model": base_model,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        return atomic_write_text(path, json.dumps(config, indent=1))

    @classmethod
    def load_erasure(cls, pipeline: D3PMPipeline, path: str | Path) -> InferenceTimeErasurePipeline:
        """``pipeline`` wrapped with the erasure saved at ``path``.

        Raises:
            ValueError: not an erasure config, a newer format version, or one made for another base model.
        """
        try:
            config = json.loads(Path(path).read_text())
            version, digits, scale = config["format_version"], config["concepts"], config["negative_scale"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{path} is not an inference-time erasure config ({error!r}).") from error
        if version > ERASURE_CONFIG_VERSION:
            raise ValueError(f"{path} has format version {version}; upgrade d3pm-hub to read it.")
        if config.get("base_model_hash") != base_model_hash(pipeline.unet):
            raise ValueError(
                f"{path} was made for another base model ({config.get('base_model') or 'unknown'}); "
                "load the pipeline it names."
            )
        combine, weights = config.get("combine", "sum"), config.get("weights")
        return cls.wrap(pipeline, digits, negative_scale=scale, combine=combine, weights=weights)

    def x0_log_probs(
        self,
        sample: torch.LongTensor,
        timestep: torch.Tensor | int,
        class_labels: torch.LongTensor,
        guidance_scale: float,
        unet: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """Guided log p̃(x0 | x_t) ``(B, K, H, W)`` with erased labels switched to null and negative guidance."""
        null = torch.full_like(class_labels, self.unet.config.num_labels)
        erased = torch.isin(class_labels, torch.tensor(self.erased_digits, device=class_labels.device))
        labels = torch.where(erased, null, class_labels)
        log_probs = super().x0_log_probs(sample, timestep, labels, guidance_scale, unet)
        if not self.negative_scale:
            return log_probs
        unconditional = super().x0_log_probs(sample, timestep, null, 0.0, unet)
        erased = torch.stack(
            [
                D3PMPipeline.x0_log_probs(self, sample, timestep, torch.full_like(null, digit), 1.0, unet)
                for digit in self.erased_digits
            ]
        )
        guided = guide_away(log_probs, unconditional, erased, self.negative_scale, self.combine, self.weights)
        return torch.log_softmax(guided, dim=1)
