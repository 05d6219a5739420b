"""Inference-time erasure (no weights change): label switching and negative guidance, as a reference point.

`InferenceTimeErasurePipeline` is a `D3PMPipeline` whose guided x0 log-probabilities

* **switch** the erased labels to the null label (an erased digit is then drawn like an unconditional sample),
* and, with ``negative_scale`` s⁻ > 0, subtract the erased digits' guidance direction from every sample
  (negative prompting / safe guidance on x0 distributions):

      log p ← log p − s⁻ Σₑ (log p(x0 | x_t, e) − log p(x0 | x_t, ∅)),   renormalised over the K levels.

It is a filter on the sampler: the weights still hold the digit (and anyone with the weights can skip it).
"""

from __future__ import annotations

import torch

from ..pipeline import D3PMPipeline
from .common import check_digits


class InferenceTimeErasurePipeline(D3PMPipeline):
    """A pipeline that never samples the erased digits' labels and guides away from them.

    Build it with `InferenceTimeErasurePipeline.wrap`; sampling is `D3PMPipeline.__call__` unchanged.
    """

    erased_digits: tuple[int, ...] = ()
    negative_scale: float = 0.0

    @classmethod
    def wrap(cls, pipeline: D3PMPipeline, digits: list[int], negative_scale: float = 0.0):
        """The same UNet and scheduler (shared, not copied) with ``digits`` erased at sampling time."""
        if negative_scale < 0:
            raise ValueError(f"negative_scale must be ≥ 0, got {negative_scale}.")
        wrapped = cls(unet=pipeline.unet, scheduler=pipeline.scheduler)
        wrapped.erased_digits = tuple(check_digits(pipeline.unet, digits))
        wrapped.negative_scale = float(negative_scale)
        return wrapped

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
        for digit in self.erased_digits:
            digit_log_probs = super().x0_log_probs(sample, timestep, torch.full_like(null, digit), 1.0, unet)
            log_probs = log_probs - self.negative_scale * (digit_log_probs - unconditional)
        return torch.log_softmax(log_probs, dim=1)
