"""The model's own reading of a clean image: which label's x0 prediction explains it best (a diffusion classifier).

For an image x0, noise it to x_t ~ q(x_t | x0) at one timestep t and score every label c by the cross-entropy of the
frozen model's x0 prediction under c,

    ĉ(x0) = argmin_c CE(z_θ(x_t, t, c), x0),

with the same x_t for every label (Li et al. 2023, "Your Diffusion Model is Secretly a Zero-Shot Classifier", at a
single t). At t = T/2 it reads 89% of 300 real MNIST digits correctly with the shipped model (93% averaged over
three timesteps, at three times the cost). On-policy rounds use it to find the null-label samples that drew an
erased digit without the evaluation's classifier, which stays a held-out measuring stick.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..scheduler import D3PMScheduler
from ..unet import D3PMUNet


@torch.no_grad()
def read_digits(
    unet: D3PMUNet,
    scheduler: D3PMScheduler,
    images: torch.Tensor,
    generator: torch.Generator,
    timestep: int | None = None,
    chunk: int = 256,
) -> torch.Tensor:
    """The label ĉ ``(B,)`` in 0..num_labels−1 that best explains each image ``(B, 1, H, W)`` (int64 levels).

    Args:
        timestep: the t the images are noised to (default T/2).
        chunk: images per forward pass.
    """
    timestep = scheduler.config.num_train_timesteps // 2 if timestep is None else timestep
    readings = []
    for part in images.split(chunk):
        x0 = part.to(unet.device)
        timesteps = torch.full((len(x0),), timestep, device=unet.device)
        x_t = scheduler.add_noise(x0, timesteps, generator).to(unet.device)
        scores = torch.stack(
            [
                F.cross_entropy(
                    unet(x_t, timesteps, torch.full_like(timesteps, label)).float(), x0[:, 0], reduction="none"
                )
                .flatten(1)
                .mean(1)
                for label in range(unet.null_label)
            ]
        )
        readings.append(scores.argmin(0).cpu())
    return torch.cat(readings)
