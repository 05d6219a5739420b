"""An independent digit classifier that reads the diffusion model's samples.

It is a small CNN trained on real MNIST digits *after* quantisation to the diffusion model's K grey levels
(``dequantize(quantize(x)) / 255``), so that the coarse grey levels of generated images are not themselves
out of distribution, and with outlier exposure (noise, blanks and pixel-shuffled digits pushed to a uniform
prediction) so that its confidence tells clean digits (≈ 0.95) from noise (≈ 0.1). Its penultimate
activations (``features``, 128 numbers per image) are the space in which Fréchet distances are measured
(:mod:`d3pm_hub.evaluation.metrics`).

Images everywhere in this module are float tensors in [0, 1] of shape ``(B, 1, 28, 28)``.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from d3pm_hub.data import dataset_to_tensors, dequantize, load_mnist, quantize
from d3pm_hub.paths import PRETRAINED

logger = logging.getLogger(__name__)

DEFAULT_CLASSIFIER_PATH = PRETRAINED / "classifier"


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """3×3 conv → BatchNorm → ReLU, spatial size kept."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DigitClassifier(ModelMixin, ConfigMixin):
    """CNN: conv stages at 28×28, 14×14 and 7×7 (2× max-pooling between them), global average pooling of
    the last stage (the features, like Inception's pool3 for FID) and a linear head to the logits.

    Args:
        channels: output channels (C1, C2, C3) of the three stages; the feature size is F = C3.
        num_classes: number of digit classes.
        dropout: dropout on the features before the head (training only).
    """

    @register_to_config
    def __init__(self, channels: tuple[int, int, int] = (32, 64, 128), num_classes: int = 10, dropout: float = 0.3):
        super().__init__()
        c1, c2, c3 = channels
        self.conv_blocks = nn.Sequential(
            _conv_block(1, c1),
            _conv_block(c1, c1),
            nn.MaxPool2d(2),
            _conv_block(c1, c2),
            _conv_block(c2, c2),
            nn.MaxPool2d(2),
            _conv_block(c2, c3),
            _conv_block(c3, c3),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.feature_dropout = nn.Dropout(dropout)
        self.head = nn.Linear(c3, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations. images: (B, 1, 28, 28) float in [0, 1] → (B, F)."""
        # Centre the inputs around MNIST's mean grey value so that the first layer starts well scaled.
        return self.conv_blocks(images - 0.13)

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits from :meth:`features`. features: (B, F) → (B, num_classes)."""
        return self.head(self.feature_dropout(features))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits. images: (B, 1, 28, 28) float in [0, 1] → (B, num_classes)."""
        return self.logits_from_features(self.features(images))


def load_classifier(path: str | Path | None = None) -> DigitClassifier:
    """The classifier saved at ``path`` (default: the shipped ``pretrained/classifier``), in eval mode."""
    if path is None:
        path = DEFAULT_CLASSIFIER_PATH
        if not path.exists():
            raise FileNotFoundError(
                f"No shipped classifier at {path}; train one with `python training/train_classifier.py`."
            )
    return DigitClassifier.from_pretrained(path, use_safetensors=True).eval()  # never a pickled .bin


def quantize_images(images: torch.Tensor, num_levels: int) -> torch.Tensor:
    """Round float images in [0, 1] to K grey levels and back: ``dequantize(quantize(255 x)) / 255``.

    images: (B, 1, 28, 28) float → same shape, float32 with only K distinct values.
    """
    levels = quantize(images.detach().cpu() * 255, num_levels)
    return dequantize(levels, num_levels).float() / 255


def load_digits(split: str, num_levels: int, source: str = "embedded") -> tuple[torch.Tensor, torch.Tensor]:
    """Real MNIST digits at K grey levels as the classifier sees them.

    Returns: images (N, 1, 28, 28) float in [0, 1] with K distinct values, labels (N,) int64.
    """
    levels, labels = dataset_to_tensors(load_mnist(source=source, split=split), num_levels)
    return dequantize(levels, num_levels).float() / 255, labels


def random_affine(
    images: torch.Tensor,
    generator: torch.Generator,
    max_degrees: float = 12.0,
    max_shift_pixels: float = 2.0,
    max_scale_change: float = 0.1,
) -> torch.Tensor:
    """Rotate, scale and shift each image by its own random amount (bilinear, zero background).

    images: (B, 1, H, W) float → same shape. Angles are uniform in ±max_degrees, shifts in
    ±max_shift_pixels, scales in 1 ± max_scale_change.
    """
    batch, _, height, _ = images.shape

    def uniform(half_width: float) -> torch.Tensor:
        return (torch.rand(batch, generator=generator) * 2 - 1) * half_width

    angle = uniform(math.radians(max_degrees))
    inverse_scale = 1 / (1 + uniform(max_scale_change))
    shift = torch.stack([uniform(max_shift_pixels), uniform(max_shift_pixels)], dim=1) * 2 / height
    cos, sin = torch.cos(angle) * inverse_scale, torch.sin(angle) * inverse_scale
    # theta maps output coordinates to input coordinates (normalised to [-1, 1]).
    theta = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], dim=1)
    theta = torch.cat([theta, shift.unsqueeze(2)], dim=2)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def synthetic_outliers(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Non-digits shaped like images (B, 1, H, W): each is uniform noise, a flat grey (black half of the
    time) or its own image with the pixels shuffled (same grey-level histogram, no strokes)."""
    batch = images.shape[0]
    noise = torch.rand(images.shape, generator=generator)
    is_black = torch.randint(2, (batch, 1, 1, 1), generator=generator)
    flat = (torch.rand(batch, 1, 1, 1, generator=generator) * is_black).expand_as(images)
    order = torch.rand(batch, images[0].numel(), generator=generator).argsort(1)
    shuffled = images.flatten(1).gather(1, order).view_as(images)
    kind = torch.randint(3, (batch, 1, 1, 1), generator=generator)
    return torch.where(kind == 0, noise, torch.where(kind == 1, flat, shuffled))


@torch.no_grad()
def predict_proba(classifier: DigitClassifier, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Softmax class probabilities (N, num_classes) of images (N, 1, 28, 28), in eval mode."""
    classifier.eval()
    return torch.cat([classifier(batch).softmax(-1) for batch in images.split(batch_size)])


def train_classifier(
    epochs: int = 30,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    weight_decay: float = 1e-4,
    label_smoothing: float = 0.05,
    outlier_weight: float = 0.5,
    num_levels: int = 32,
    source: str = "embedded",
    seed: int = 0,
) -> tuple[DigitClassifier, dict]:
    """Train a :class:`DigitClassifier` on the ``train`` split and measure it on the held-out ``test`` split.

    Each batch is randomly rotated/scaled/shifted (:func:`random_affine`) and then re-quantised to
    ``num_levels`` grey levels, so training images look like the diffusion model's outputs. A quarter as many
    :func:`synthetic_outliers` join each batch with a cross-entropy to the uniform distribution (outlier
    exposure, weight ``outlier_weight``), so that noise and blanks get a low confidence instead of an
    arbitrary confident digit. AdamW with a one-cycle learning-rate schedule fixed in advance (the test
    split never steers training).

    Returns:
        The trained classifier (eval mode) and a dict with ``test_accuracy``, ``train_accuracy``,
        ``test_mean_confidence`` (softmax probability of the predicted digit), ``outlier_mean_confidence``
        (the same on outliers made from the test digits), ``train_seconds`` (the optimisation loop),
        ``torch_threads``, ``num_train``, ``num_test`` and the hyper-parameters.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train_images, train_labels = load_digits("train", num_levels, source)
    test_images, test_labels = load_digits("test", num_levels, source)
    classifier = DigitClassifier()
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=learning_rate, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_labels) / batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=learning_rate, total_steps=epochs * steps_per_epoch
    )
    start = time.perf_counter()
    for epoch in range(epochs):
        classifier.train()
        order = torch.randperm(len(train_labels), generator=generator)
        for batch_indices in order.split(batch_size):
            digits = random_affine(train_images[batch_indices], generator)
            outliers = synthetic_outliers(digits[: len(digits) // 4], generator)
            logits = classifier(quantize_images(torch.cat([digits, outliers]), num_levels))
            digit_logits, outlier_logits = logits[: len(digits)], logits[len(digits) :]
            digit_loss = F.cross_entropy(digit_logits, train_labels[batch_indices], label_smoothing=label_smoothing)
            outlier_loss = -outlier_logits.log_softmax(-1).mean()
            loss = digit_loss + outlier_weight * outlier_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        logger.info("epoch %d/%d: digit loss %.4f, outlier loss %.4f", epoch + 1, epochs, digit_loss, outlier_loss)
    train_seconds = time.perf_counter() - start
    test_probabilities = predict_proba(classifier, test_images)
    train_predictions = predict_proba(classifier, train_images).argmax(-1)
    test_outliers = quantize_images(synthetic_outliers(test_images, generator), num_levels)
    metrics = {
        "test_accuracy": round((test_probabilities.argmax(-1) == test_labels).float().mean().item(), 4),
        "train_accuracy": round((train_predictions == train_labels).float().mean().item(), 4),
        "test_mean_confidence": round(test_probabilities.max(-1).values.mean().item(), 4),
        "outlier_mean_confidence": round(predict_proba(classifier, test_outliers).max(-1).values.mean().item(), 4),
        "train_seconds": round(train_seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "num_train": len(train_labels),
        "num_test": len(test_labels),
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "outlier_weight": outlier_weight,
        "num_levels": num_levels,
        "source": source,
        "seed": seed,
    }
    return classifier.eval(), metrics
