"""D3PMPipeline: labels → strided reverse D3PM process with classifier-free guidance → images."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from PIL import Image

from .data import dequantize
from .hub import resolve_folder
from .scheduler import D3PMScheduler
from .unet import D3PMUNet

OUTPUT_TYPES = ("pil", "np", "pt")
DEFAULT_NUM_INFERENCE_STEPS = 15
DEFAULT_GUIDANCE_SCALE = 1.0


class D3PMPipeline(DiffusionPipeline):
    """Class-conditional sampling from a D3PM.

    Args:
        unet: predicts x0 logits from x_t, t and a label context.
        scheduler: the discrete forward process and its reverse steps.

    Examples:
        >>> pipe = D3PMPipeline.from_pretrained("pretrained/d3pm-mnist")
        >>> images = pipe([0, 1, 9], generator=torch.Generator().manual_seed(0)).images
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: D3PMUNet, scheduler: D3PMScheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, revision: str | None = None, **kwargs):
        """Load from a local folder or a Hub repo id (downloaded with huggingface_hub, safetensors only).

        Without ``torch_dtype`` the UNet is returned in float32 whatever precision it was stored in.
        """
        folder = resolve_folder(pretrained_model_name_or_path, revision=revision)
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(
                f"{folder} has no model_index.json: it is not a saved D3PMPipeline "
                "(expected model_index.json, unet/ and scheduler/ from save_pretrained)."
            )
        if "torch_dtype" not in kwargs:
            kwargs.setdefault("dtype", torch.float32)
        return super().from_pretrained(folder, use_safetensors=True, **kwargs)

    def _prepare_labels(self, class_labels: int | list[int] | torch.Tensor) -> torch.LongTensor:
        labels = torch.as_tensor(class_labels).reshape(-1)
        if labels.numel() == 0:
            raise ValueError("class_labels is empty: pass at least one label.")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"class_labels must be integers, got {labels.dtype}.")
        null = self.unet.config.num_labels
        if labels.min() < 0 or labels.max() > null:
            raise ValueError(f"class_labels must lie in 0..{null} ({null} = unconditional), got {labels.tolist()}.")
        return labels.long().to(self._execution_device)

    def unet_with_parameters(self, unet_parameters: dict[str, torch.Tensor]) -> D3PMUNet:
        """A private copy of the UNet carrying ``unet_parameters`` (names as in ``unet.named_parameters()``).

        Each call that brings its own weights gets its own module (a ~7 MB copy, milliseconds), so concurrent
        calls with different weights never see each other's tensors.
        """
        unet = copy.deepcopy(self.unet)
        missing_or_unknown = unet.load_state_dict(unet_parameters, strict=False)
        if missing_or_unknown.unexpected_keys:
            raise ValueError(f"unet_parameters has names the UNet lacks: {missing_or_unknown.unexpected_keys[:5]}")
        return unet

    def x0_log_probs(
        self,
        sample: torch.LongTensor,
        timestep: torch.Tensor | int,
        class_labels: torch.LongTensor,
        guidance_scale: float,
        unet: D3PMUNet | None = None,
    ) -> torch.Tensor:
        """Guided log p̃(x0 | x_t), ``(B, K, H, W)``, from ``unet`` (default: the pipeline's own).

        log p = log p_uncond + s · (log p_cond − log p_uncond), renormalised over the K levels; s = 1 is the
        conditional model, s = 0 the unconditional one (each then needs a single forward pass).
        """
        unet = self.unet if unet is None else unet

        def log_probs(labels: torch.LongTensor, states: torch.LongTensor) -> torch.Tensor:
            return torch.log_softmax(unet(states, timestep, labels).double(), dim=1)

        null_labels = torch.full_like(class_labels, self.unet.config.num_labels)
        if guidance_scale == 1:
            return log_probs(class_labels, sample)
        if guidance_scale == 0:
            return log_probs(null_labels, sample)
        cond, uncond = log_probs(torch.cat([class_labels, null_labels]), torch.cat([sample, sample])).chunk(2)
        return torch.log_softmax(uncond + guidance_scale * (cond - uncond), dim=1)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | torch.Tensor,
        num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        unet_parameters: dict[str, torch.Tensor] | None = None,
        temperature: float = 1.0,
        callback_on_step_end: Callable[[D3PMPipeline, int, int, dict], dict | None] | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Sample one image per label.

        Args:
            class_labels: digits 0..9, or 10 for an unconditional sample; an int, list or ``(B,)`` tensor.
            num_inference_steps: reverse steps, 1..num_train_timesteps (exact strided transitions).
            guidance_scale: s of classifier-free guidance (1 = conditional only, 0 = unconditional).
            generator: a ``torch.Generator`` for reproducible samples.
            output_type: ``"pil"`` (list of 28×28 L images), ``"np"`` ((B, H, W, 1) float in [0, 1]) or
                ``"pt"`` ((B, 1, H, W) float in [0, 1]).
            return_dict: return an `ImagePipelineOutput` rather than a tuple.
            unet_parameters: parameters to use instead of the UNet's own for this call only (e.g. base weights
                plus erasure deltas), loaded into a private copy of the UNet, so concurrent calls never share them.
            temperature: τ in p̃(x0)^{1/τ}: below 1 sharpens the x0 prediction (fewer stray grey levels).
            callback_on_step_end: called as ``callback(pipeline, step_index, timestep, {"sample": x_{t-1}})`` after
                each reverse step (as in diffusers); it may return ``{"sample": ...}`` to replace the sample.

        Returns:
            `ImagePipelineOutput` with ``images``.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}.")
        if not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
            raise ValueError(f"temperature must be a positive finite number, got {temperature!r}.")
        labels = self._prepare_labels(class_labels)
        device = self._execution_device
        size = self.unet.config.sample_size
        unet = self.unet if unet_parameters is None else self.unet_with_parameters(unet_parameters)
        # A shallow copy per call: set_timesteps rebinds attributes, so concurrent calls never share them.
        scheduler = copy.copy(self.scheduler)
        scheduler.set_timesteps(num_inference_steps)
        sample = scheduler.prior_sample((len(labels), 1, size, size), generator, device)
        for index, t in enumerate(self.progress_bar(scheduler.timesteps.tolist())):
            x0_log_probs = self.x0_log_probs(sample, t, labels, guidance_scale, unet) / temperature
            sample = scheduler.step(x0_log_probs, t, sample, generator=generator).prev_sample
            if callback_on_step_end is not None:
                sample = (callback_on_step_end(self, index, t, {"sample": sample}) or {}).get("sample", sample)
        images = self.levels_to_images(sample, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def levels_to_images(self, levels: torch.LongTensor, output_type: str = "pil"):
        """``(B, 1, H, W)`` levels → PIL list, ``(B, H, W, 1)`` numpy or ``(B, 1, H, W)`` tensor in [0, 1]."""
        pixels = dequantize(levels.cpu(), self.scheduler.config.num_classes)
        if output_type == "pil":
            return [Image.fromarray(image[0].numpy(), mode="L") for image in pixels]
        images = pixels.float() / 255
        return images.permute(0, 2, 3, 1).numpy().astype(np.float32) if output_type == "np" else images
