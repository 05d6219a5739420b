"""Sample-quality metrics: the one implementation behind the benchmarks, the app and the model cards.

Everything is read through the independent :class:`~d3pm_hub.evaluation.classifier.DigitClassifier`:

* **accuracy** — a sample generated for label c counts as correct when the classifier's arg-max is c;
* **confidence** — the classifier's softmax probability of its arg-max class (clean digits ≈ 1, noise lower);
* **Fréchet distance (FD)** — between Gaussians fitted to classifier features (F = 128) of generated and
  real images, per class and overall, always reported beside the real-vs-real floor (FD between two
  disjoint random halves of the real set), since FD of finite samples is never 0.

Images are float tensors in [0, 1] of shape ``(B, 1, 28, 28)``; labels are ints 0..9, or 10 for the null
(unconditional) label, whose samples are not scored for accuracy but summarised as ``null_digit_rates``.
"""

from __future__ import annotations

import inspect
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from PIL import Image

from d3pm_hub.evaluation.classifier import DigitClassifier, load_digits

NUM_DIGITS = 10
NULL_LABEL = 10


def frechet_distance(feats_a: np.ndarray | torch.Tensor, feats_b: np.ndarray | torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (as in pytorch-fid).

    FD = ‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^{1/2}).

    Args:
        feats_a: (N_a, F) features, N_a ≥ 2.
        feats_b: (N_b, F) features, N_b ≥ 2.

    With fewer samples than dimensions (or identical samples) the covariances are singular and ``sqrtm``
    may fail; then ε·I (ε = 1e-6) is added to both covariances. The trace's imaginary part, numerical
    error since Σ_a Σ_b has real non-negative eigenvalues, is dropped. Computed in float64.
    """
    feats_a, feats_b = (np.asarray(torch.as_tensor(f).double().cpu()) for f in (feats_a, feats_b))
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    sigma_a, sigma_b = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    with warnings.catch_warnings():  # a singular product is expected here and handled just below
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma_a @ sigma_b)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(mu_a)) * 1e-6
        covmean = scipy.linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    distance = ((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a) + np.trace(sigma_b) - 2 * np.trace(covmean).real
    return float(max(distance, 0.0))


@torch.no_grad()
def features_and_logits(
    classifier: DigitClassifier, images: torch.Tensor, batch_size: int = 500
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier features (B, F) and logits (B, 10) of images (B, 1, 28, 28), both float32 on the CPU."""
    classifier.eval()
    features, logits = [], []
    for batch in images.split(batch_size):
        batch_features = classifier.features(batch.float().to(classifier.device))
        features.append(batch_features.float().cpu())
        logits.append(classifier.logits_from_features(batch_features).float().cpu())
    return torch.cat(features), torch.cat(logits)


def classify(
    classifier: DigitClassifier, images: torch.Tensor, batch_size: int = 500
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted digit (B,) int64 and its softmax probability (B,) float for images (B, 1, 28, 28)."""
    _, logits = features_and_logits(classifier, images, batch_size)
    confidence, pred = logits.softmax(-1).max(-1)
    return pred, confidence


@dataclass
class RealReference:
    """Classifier features of real digits and the real-vs-real FD floor.

    Attributes:
        features: (N, F) features of the real images.
        labels: (N,) their digits.
        fd_floor_per_class: FD between two disjoint random halves of each digit's real images (10 floats).
        fd_floor_overall: the same over all digits.
        num_levels: grey levels K the real images were quantised to.
    """

    features: torch.Tensor
    labels: torch.Tensor
    fd_floor_per_class: list[float]
    fd_floor_overall: float
    num_levels: int

    def class_features(self, digit: int) -> torch.Tensor:
        """(N_c, F) features of the real images of one digit."""
        return self.features[self.labels == digit]


def _fd_between_halves(features: torch.Tensor, generator: torch.Generator) -> float:
    """FD between two disjoint random halves of features (N, F)."""
    order = torch.randperm(len(features), generator=generator)
    half = len(features) // 2
    return frechet_distance(features[order[:half]], features[order[half : 2 * half]])


def real_reference(
    classifier: DigitClassifier, num_levels: int = 32, source: str = "embedded", seed: int = 0
) -> RealReference:
    """Features of every real digit of ``load_mnist(source, "all")`` at K grey levels, plus the FD floor.

    The floor splits the real images of each digit (and all of them together) into two random halves
    (fixed ``seed``) and measures FD between the halves: the distance two sets of real digits of that size
    are apart. It is an estimate at N/2 samples per set; FD of smaller sets is larger (its bias grows
    like 1/N), so compare samples of similar size when judging "near the floor".
    """
    images, labels = load_digits("all", num_levels, source)
    features, _ = features_and_logits(classifier, images)
    generator = torch.Generator().manual_seed(seed)
    floor_per_class = [_fd_between_halves(features[labels == c], generator) for c in range(NUM_DIGITS)]
    return RealReference(
        features=features,
        labels=labels,
        fd_floor_per_class=floor_per_class,
        fd_floor_overall=_fd_between_halves(features, generator),
        num_levels=num_levels,
    )


def _mean(values: torch.Tensor) -> float | None:
    """Mean of a 1-D (boolean or float) tensor, or None when it is empty."""
    return values.float().mean().item() if len(values) else None


def _fd_or_none(feats: torch.Tensor, reference_feats: torch.Tensor) -> float | None:
    """FD when there are at least two samples, else None."""
    return frechet_distance(feats, reference_feats) if len(feats) >= 2 else None


def matched_reference(reference: RealReference, predicted: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Real features ``(M, F)`` whose digits follow the histogram of ``predicted`` ``(B,)``.

    For each digit d the classifier read n_d times, ⌊n_d / B · N_d*⌋ real features of d are drawn without
    replacement (N_d* the largest count all read digits allow), so FD against them asks "do these samples look
    like real digits of the classes they are read as?" — the cleanliness test for an erased label's samples.
    """
    counts = torch.bincount(predicted, minlength=NUM_DIGITS).double()
    shares = counts / counts.sum()
    available = torch.tensor([len(reference.class_features(d)) for d in range(NUM_DIGITS)], dtype=torch.float64)
    total = min(available[d] / shares[d] for d in range(NUM_DIGITS) if shares[d] > 0)
    generator = torch.Generator().manual_seed(seed)
    parts = []
    for digit in range(NUM_DIGITS):
        if shares[digit] > 0:
            features = reference.class_features(digit)
            take = int(shares[digit] * total)
            parts.append(features[torch.randperm(len(features), generator=generator)[:take]])
    return torch.cat(parts)


def evaluate_images(
    classifier: DigitClassifier,
    images: torch.Tensor,
    labels: torch.Tensor | list[int],
    reference: RealReference,
) -> dict:
    """Score generated images against the labels they were generated for.

    Args:
        classifier: the digit classifier.
        images: (B, 1, 28, 28) float in [0, 1].
        labels: (B,) ints 0..9, or 10 (null label) for unconditional samples.
        reference: :func:`real_reference` of the same classifier.

    Returns:
        A JSON-friendly dict. Lists indexed by digit 0..9 hold None for digits without samples.

        * ``num_samples``, ``num_null_samples``;
        * ``per_class_accuracy`` (rate of label c read as c), ``mean_accuracy`` (over labels present),
          ``min_class_accuracy``;
        * ``per_class_confidence`` and ``mean_confidence`` (softmax probability of the predicted digit,
          over labelled samples);
        * ``confusion``: 10×10 rates, row = label, column = predicted digit (rows sum to 1);
        * ``fd_per_class`` (samples of label c vs real c) and ``fd_overall`` (all labelled samples vs all
          real digits), with ``fd_floor_per_class`` / ``fd_floor_overall`` beside them;
        * ``fd_as_read_per_class``: samples of label c vs real digits of the classes the classifier read them
          as (`matched_reference`) — equal to ``fd_per_class`` for an accurate label, and the cleanliness of
          an erased label's samples whatever they became;
        * ``null_digit_rates``: rate of each predicted digit among null-label samples, ``fd_null``
          (null samples vs all real digits); both None without null samples.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    features, logits = features_and_logits(classifier, images)
    confidence, pred = logits.softmax(-1).max(-1)
    scored, null = labels < NUM_DIGITS, labels == NULL_LABEL
    present = [c for c in range(NUM_DIGITS) if (labels == c).any()]
    per_class_accuracy = [_mean(pred[labels == c] == c) for c in range(NUM_DIGITS)]
    confusion = [[_mean(pred[labels == c] == d) for d in range(NUM_DIGITS)] for c in range(NUM_DIGITS)]
    return {
        "num_samples": int(scored.sum()),
        "num_null_samples": int(null.sum()),
        "per_class_accuracy": per_class_accuracy,
        "mean_accuracy": float(np.mean([per_class_accuracy[c] for c in present])) if present else None,
        "min_class_accuracy": min(per_class_accuracy[c] for c in present) if present else None,
        "per_class_confidence": [_mean(confidence[labels == c]) for c in range(NUM_DIGITS)],
        "mean_confidence": _mean(confidence[scored]),
        "confusion": confusion,
        "fd_per_class": [_fd_or_none(features[labels == c], reference.class_features(c)) for c in range(NUM_DIGITS)],
        "fd_as_read_per_class": [
            _fd_or_none(features[labels == c], matched_reference(reference, pred[labels == c]))
            if (labels == c).sum() >= 2
            else None
            for c in range(NUM_DIGITS)
        ],
        "fd_overall": _fd_or_none(features[scored], reference.features),
        "fd_floor_per_class": reference.fd_floor_per_class,
        "fd_floor_overall": reference.fd_floor_overall,
        "null_digit_rates": [_mean(pred[null] == d) for d in range(NUM_DIGITS)] if null.any() else None,
        "fd_null": _fd_or_none(features[null], reference.features),
    }


def _sampler_settings(pipeline, num_inference_steps: int | None, guidance_scale: float | None) -> dict:
    """The given sampler settings, with None replaced by the default of the pipeline's ``__call__``."""
    parameters = inspect.signature(pipeline.__call__).parameters
    settings = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale}
    for name, value in settings.items():
        if value is None:
            if name not in parameters or parameters[name].default is inspect.Parameter.empty:
                raise ValueError(f"The pipeline has no default {name}: pass it explicitly.")
            settings[name] = parameters[name].default
    return settings


def _generator_for(seed: int, label: int, chunk_index: int) -> torch.Generator:
    """A CPU generator seeded from (seed, label, chunk index), so every label's noise is its own."""
    state = np.random.SeedSequence([seed, label, chunk_index]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def sample_images(
    pipeline,
    labels: list[int],
    samples_per_label: int,
    num_inference_steps: int,
    guidance_scale: float,
    seed: int = 0,
    batch_size: int | None = None,
    **pipeline_kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``samples_per_label`` images for each label, drawn in calls of at most ``batch_size`` images.

    Each call holds a single label and gets its own generator seeded from (seed, label, call index), so
    the samples of a label do not depend on the other labels, and not on ``batch_size`` as long as
    ``batch_size ≥ samples_per_label`` (the default, None, draws each label in one call). ``pipeline_kwargs``
    go to every call (e.g. ``unet_parameters`` of composed deltas, or ``temperature``).

    Returns: images (len(labels)·samples_per_label, 1, 28, 28) float in [0, 1] on the CPU, and their labels.
    """
    if samples_per_label < 1 or (batch_size is not None and batch_size < 1):
        raise ValueError(f"samples_per_label and batch_size must be ≥ 1, got {samples_per_label} and {batch_size}.")
    chunk = samples_per_label if batch_size is None else min(batch_size, samples_per_label)
    images, image_labels = [], []
    for label in labels:
        for chunk_index, start in enumerate(range(0, samples_per_label, chunk)):
            count = min(chunk, samples_per_label - start)
            output = pipeline(
                class_labels=[label] * count,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=_generator_for(seed, label, chunk_index),
                output_type="pt",
                **pipeline_kwargs,
            )
            images.append(output.images.float().cpu())
            image_labels += [label] * count
    return torch.cat(images), torch.tensor(image_labels)


def evaluate_pipeline(
    pipeline,
    classifier: DigitClassifier,
    samples_per_label: int = 100,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    include_null: bool = True,
    batch_size: int | None = None,
    reference: RealReference | None = None,
    grid_path: str | Path | None = None,
    **pipeline_kwargs,
) -> dict:
    """Sample every label 0..9 (and the null label 10 when ``include_null``) and score the samples.

    Args:
        pipeline: called as ``pipeline(class_labels, num_inference_steps, guidance_scale, generator,
            output_type="pt")``, returning ``.images`` (B, 1, 28, 28) float in [0, 1].
        classifier: the digit classifier.
        samples_per_label: images per label (100 in the benchmarks).
        num_inference_steps, guidance_scale: sampler settings; None takes the pipeline's defaults.
        seed: base seed; see :func:`sample_images` for how it is spread over labels and calls.
        include_null: also sample the null label and report ``null_digit_rates``.
        batch_size: most images per pipeline call (None: one call per label).
        reference: :func:`real_reference` to reuse across calls (computed at the model's grey levels when None).
        grid_path: if given, a PNG grid of the samples (:func:`save_grid`) is written there.
        pipeline_kwargs: further arguments of every pipeline call, e.g. ``unet_parameters`` (deltas composed with
            `~d3pm_hub.deltas.compose_parameters`) or ``temperature``.

    Returns:
        :func:`evaluate_images`'s dict plus ``samples_per_label``, ``num_inference_steps``,
        ``guidance_scale``, ``seed``, ``batch_size`` and ``sampling_seconds``.
    """
    settings = _sampler_settings(pipeline, num_inference_steps, guidance_scale)
    num_levels = pipeline.scheduler.config.num_classes
    reference = reference if reference is not None else real_reference(classifier, num_levels)
    if reference.num_levels != num_levels:
        raise ValueError(
            f"The real-digit reference is at {reference.num_levels} grey levels, the model samples {num_levels}: "
            f"build it with real_reference(classifier, num_levels={num_levels})."
        )
    labels = list(range(NUM_DIGITS)) + ([NULL_LABEL] if include_null else [])
    start = time.perf_counter()
    images, image_labels = sample_images(
        pipeline, labels, samples_per_label, seed=seed, batch_size=batch_size, **settings, **pipeline_kwargs
    )
    sampling_seconds = time.perf_counter() - start
    if grid_path is not None:
        save_grid(images, image_labels, grid_path)
    result = evaluate_images(classifier, images, image_labels, reference)
    result.update(settings)
    result.update(
        {
            "samples_per_label": samples_per_label,
            "seed": seed,
            "batch_size": batch_size,
            "sampling_seconds": sampling_seconds,
        }
    )
    return result


def _cell(value: float | None, width: int, digits: int = 3) -> str:
    """A right-aligned number, or '-' for None."""
    return f"{'-' if value is None else f'{value:.{digits}f}':>{width}}"


def format_table(result: dict) -> str:
    """A plain-text table of an :func:`evaluate_images` / :func:`evaluate_pipeline` result.

    One row per digit: accuracy, confidence, FD, real-vs-real floor and the digit it is most often
    mistaken for; then the mean / overall row, the null-label digit rates and the sampler settings.
    """
    lines = [f"{'digit':>5} {'accuracy':>9} {'confidence':>11} {'FD':>8} {'floor':>8}  most confused with"]
    for digit in range(NUM_DIGITS):
        row = result["confusion"][digit]
        mistakes = [(rate, other) for other, rate in enumerate(row) if other != digit and rate]
        confused = "-" if not mistakes else "{1} ({0:.3f})".format(*max(mistakes))
        accuracy, confidence = result["per_class_accuracy"][digit], result["per_class_confidence"][digit]
        fd, floor = result["fd_per_class"][digit], result["fd_floor_per_class"][digit]
        numbers = f"{_cell(accuracy, 9)} {_cell(confidence, 11)} {_cell(fd, 8, 2)} {_cell(floor, 8, 2)}"
        lines.append(f"{digit:>5} {numbers}  {confused}")
    lines.append(
        f"{'all':>5} {_cell(result['mean_accuracy'], 9)} {_cell(result['mean_confidence'], 11)} "
        f"{_cell(result['fd_overall'], 8, 2)} {_cell(result['fd_floor_overall'], 8, 2)}  "
        f"(min class accuracy {_cell(result['min_class_accuracy'], 0)})"
    )
    if result["null_digit_rates"] is not None:
        rates = " ".join(f"{d}:{rate:.2f}" for d, rate in enumerate(result["null_digit_rates"]))
        lines.append(f"null label ({result['num_null_samples']} samples, FD {_cell(result['fd_null'], 0, 2)}): {rates}")
    if "sampling_seconds" in result:
        lines.append(
            f"sampler: {result['num_inference_steps']} steps, guidance {result['guidance_scale']}, "
            f"{result['samples_per_label']} per label, seed {result['seed']}, "
            f"{result['sampling_seconds']:.1f} s of sampling"
        )
    return "\n".join(lines)


def save_grid(
    images: torch.Tensor,
    labels: torch.Tensor | list[int],
    path: str | Path,
    columns: int = 10,
    scale: int = 2,
) -> Path:
    """Write a PNG with one row per label (ascending; the null label 10 last) of its first ``columns`` images.

    Args:
        images: (B, 1, 28, 28) float in [0, 1].
        labels: (B,) the label each image was generated for.
        path: where to write the PNG (parent folders are created).
        columns: most images per row (fewer when no label has that many).
        scale: nearest-neighbour upscaling factor.

    Returns: the path written.
    """
    labels = torch.as_tensor(labels)
    pad, size = 2, images.shape[-1]
    rows, counts = labels.unique(return_counts=True)
    rows, columns = rows.tolist(), min(columns, int(counts.max()))
    canvas = np.full((len(rows) * (size + pad) + pad, columns * (size + pad) + pad), 128, dtype=np.uint8)
    for row, label in enumerate(rows):
        for column, image in enumerate(images[labels == label][:columns]):
            top, left = pad + row * (size + pad), pad + column * (size + pad)
            canvas[top : top + size, left : left + size] = (image[0].clamp(0, 1) * 255).round().byte().numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST).save(path)
    return path
