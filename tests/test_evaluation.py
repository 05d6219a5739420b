"""The shipped digit classifier and the metrics built on it, with real digits, noise and a fake pipeline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from d3pm_hub.evaluation import (
    DigitClassifier,
    classify,
    evaluate_images,
    evaluate_pipeline,
    format_table,
    frechet_distance,
    load_classifier,
    real_reference,
    save_grid,
)
from d3pm_hub.evaluation.classifier import DEFAULT_CLASSIFIER_PATH, load_digits


@pytest.fixture(scope="module")
def classifier() -> DigitClassifier:
    return load_classifier()


@pytest.fixture(scope="module")
def reference(classifier):
    return real_reference(classifier)


@pytest.fixture(scope="module")
def test_digits() -> tuple[torch.Tensor, torch.Tensor]:
    return load_digits("test", num_levels=32)


class FakePipeline:
    """D3PMPipeline's call signature; label c returns real test digits of c, the null label returns noise."""

    scheduler = SimpleNamespace(config=SimpleNamespace(num_classes=32))

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __call__(
        self,
        class_labels: list[int],
        num_inference_steps: int = 7,
        guidance_scale: float = 2.5,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
    ) -> SimpleNamespace:
        assert output_type == "pt"
        images = []
        for label in class_labels:
            if label == 10:
                images.append(torch.rand(1, 28, 28, generator=generator))
            else:
                candidates = torch.nonzero(self.labels == label)[:, 0]
                pick = torch.randint(len(candidates), (1,), generator=generator)
                images.append(self.images[candidates[pick][0]])
        return SimpleNamespace(images=torch.stack(images))


def test_shipped_classifier_reads_known_digits(classifier, test_digits):
    images, labels = test_digits
    pred, confidence = classify(classifier, images[:32])
    assert torch.equal(pred, labels[:32])
    assert confidence.shape == (32,) and confidence.min() > 0.5
    assert classifier.features(images[:4]).shape == (4, 128)
    metrics = json.loads((DEFAULT_CLASSIFIER_PATH / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.985
    assert (DEFAULT_CLASSIFIER_PATH / "diffusion_pytorch_model.safetensors").stat().st_size < 2_000_000


def test_classifier_save_load_round_trip(tmp_path):
    model = DigitClassifier(channels=(4, 8, 8)).eval()
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = load_classifier(tmp_path)
    images = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded(images), model(images))


def test_classifier_weights_load_from_safetensors_only(tmp_path):
    DigitClassifier(channels=(4, 8, 8)).save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(OSError, match="safetensors"):
        load_classifier(tmp_path)  # a pickled .bin is never unpickled


def test_frechet_distance_identity_symmetry_and_mean_shift():
    generator = torch.Generator().manual_seed(0)
    feats_a = torch.randn(300, 16, generator=generator)
    feats_b = torch.randn(200, 16, generator=generator) * 1.5
    assert frechet_distance(feats_a, feats_a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(feats_a, feats_b) == pytest.approx(frechet_distance(feats_b, feats_a), rel=1e-6)
    shift = torch.full((16,), 0.5)  # same covariance: FD = ‖shift‖² = 16 · 0.25
    assert frechet_distance(feats_a, feats_a + shift) == pytest.approx(4.0, rel=1e-6)
    few = torch.randn(5, 16, generator=generator)  # singular covariance
    assert np.isfinite(frechet_distance(few, feats_a))


def test_real_held_out_digits_score_near_the_floor(classifier, reference, test_digits):
    result = evaluate_images(classifier, *test_digits, reference)
    assert result["mean_accuracy"] >= 0.95 and result["min_class_accuracy"] >= 0.9
    assert result["mean_confidence"] > 0.8
    assert result["fd_overall"] < 3 * result["fd_floor_overall"]
    ratios = np.array(result["fd_per_class"]) / np.array(result["fd_floor_per_class"])
    assert ratios.mean() < 3
    assert np.allclose(np.array(result["confusion"]).sum(1), 1)
    assert result["null_digit_rates"] is None and result["fd_null"] is None


def test_fd_as_read_scores_clean_digits_of_another_class(classifier, reference, test_digits):
    """Real 4s and 7s generated "for label 9" are far from real 9s but close to the digits they are read as."""
    images, labels = test_digits
    relabelled = labels.clone()
    relabelled[(labels == 4) | (labels == 7)] = 9
    kept = (labels == 4) | (labels == 7) | (labels == 0)
    result = evaluate_images(classifier, images[kept], relabelled[kept], reference)
    assert result["per_class_accuracy"][9] < 0.05
    assert result["fd_as_read_per_class"][9] < 3 * max(reference.fd_floor_per_class[d] for d in (4, 7))
    assert result["fd_per_class"][9] > 5 * result["fd_as_read_per_class"][9]
    assert result["fd_as_read_per_class"][0] == pytest.approx(result["fd_per_class"][0], rel=0.5)
    assert result["fd_as_read_per_class"][1] is None


@pytest.mark.parametrize("kind", ["uniform noise", "blank"])
def test_noise_and_blank_images_score_low(classifier, reference, test_digits, kind):
    _, labels = test_digits
    shape = (len(labels), 1, 28, 28)
    images = torch.zeros(shape) if kind == "blank" else torch.rand(shape, generator=torch.Generator().manual_seed(0))
    result = evaluate_images(classifier, images, labels, reference)
    assert result["mean_accuracy"] < 0.3
    assert result["mean_confidence"] < 0.5
    assert result["fd_overall"] > 50 * result["fd_floor_overall"]
    assert min(result["fd_per_class"]) > 20 * max(result["fd_floor_per_class"])


def test_null_label_samples_give_digit_rates(classifier, reference, test_digits):
    images, labels = test_digits
    labels = labels.clone()
    labels[:200] = 10
    result = evaluate_images(classifier, images, labels, reference)
    assert (result["num_samples"], result["num_null_samples"]) == (800, 200)
    assert sum(result["null_digit_rates"]) == pytest.approx(1.0)
    assert max(result["null_digit_rates"]) < 0.3  # the first 200 test digits are a mix of all digits
    assert result["fd_null"] < 10 * result["fd_floor_overall"]


def test_evaluate_pipeline_schema(classifier, reference, test_digits, tmp_path):
    pipeline = FakePipeline(*test_digits)
    result = evaluate_pipeline(
        pipeline, classifier, samples_per_label=12, seed=3, reference=reference, grid_path=tmp_path / "grid.png"
    )
    expected_keys = {
        "num_samples",
        "num_null_samples",
        "per_class_accuracy",
        "mean_accuracy",
        "min_class_accuracy",
        "per_class_confidence",
        "mean_confidence",
        "confusion",
        "fd_per_class",
        "fd_as_read_per_class",
        "fd_overall",
        "fd_floor_per_class",
        "fd_floor_overall",
        "null_digit_rates",
        "fd_null",
        "num_inference_steps",
        "guidance_scale",
        "samples_per_label",
        "seed",
        "batch_size",
        "sampling_seconds",
    }
    assert set(result) == expected_keys
    assert (result["num_inference_steps"], result["guidance_scale"]) == (7, 2.5)  # the pipeline's defaults
    assert (result["num_samples"], result["num_null_samples"]) == (120, 12)
    assert all(len(result[key]) == 10 for key in ("per_class_accuracy", "fd_per_class", "null_digit_rates"))
    assert np.array(result["confusion"]).shape == (10, 10)
    assert result["mean_accuracy"] >= 0.9 and result["sampling_seconds"] >= 0
    json.dumps(result)
    assert Image.open(tmp_path / "grid.png").size == (2 * (10 * 30 + 2), 2 * (11 * 30 + 2))
    assert "null label (12 samples" in format_table(result)


def test_evaluate_pipeline_seeds_do_not_depend_on_batch_size(classifier, reference, test_digits):
    pipeline = FakePipeline(*test_digits)
    kwargs = {"samples_per_label": 6, "num_inference_steps": 2, "guidance_scale": 1.0, "reference": reference}
    whole = evaluate_pipeline(pipeline, classifier, batch_size=None, **kwargs)
    batched = evaluate_pipeline(pipeline, classifier, batch_size=6, include_null=False, **kwargs)
    assert whole["num_inference_steps"] == 2
    assert whole["fd_per_class"] == batched["fd_per_class"]
    assert batched["null_digit_rates"] is None


def test_evaluate_pipeline_passes_its_further_arguments_to_every_call(classifier, reference, test_digits):
    calls = []

    class Recording(FakePipeline):
        def __call__(self, class_labels, unet_parameters=None, **kwargs):
            calls.append(unet_parameters)
            return super().__call__(class_labels, **kwargs)

    parameters = {"weight": torch.zeros(1)}  # what composed deltas pass
    settings = {"num_inference_steps": 2, "guidance_scale": 1.0, "batch_size": 1, "reference": reference}
    evaluate_pipeline(Recording(*test_digits), classifier, samples_per_label=2, unet_parameters=parameters, **settings)
    assert len(calls) == 22 and all(call is parameters for call in calls)  # 11 labels, 2 calls each


def test_evaluate_pipeline_refuses_a_reference_at_other_grey_levels(classifier, reference, test_digits):
    pipeline = FakePipeline(*test_digits)
    pipeline.scheduler = SimpleNamespace(config=SimpleNamespace(num_classes=16))
    with pytest.raises(ValueError, match="at 32 grey levels, the model samples 16"):
        evaluate_pipeline(pipeline, classifier, samples_per_label=2, reference=reference)


def test_save_grid_rows_per_label(tmp_path):
    images = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    path = save_grid(images, [0, 0, 0, 1, 1, 10], tmp_path / "sub" / "grid.png", columns=4, scale=1)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (3 * 30 + 2, 3 * 30 + 2)
    np.testing.assert_array_equal(grid[2:30, 2:30], (images[0, 0] * 255).round().byte().numpy())
