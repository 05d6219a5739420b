"""The shipped checkpoint: a broken or mis-trained one must not ship silently (slow: real weights)."""

import json

import pytest
import torch

from d3pm_hub import D3PMPipeline
from d3pm_hub.deltas import ConceptDelta, compose_parameters
from d3pm_hub.erasure.anchors import anchors_of
from d3pm_hub.erasure.interactions import increment_hash, stored_term
from d3pm_hub.erasure.on_policy import without_pair_terms
from d3pm_hub.evaluation import classify, load_classifier
from d3pm_hub.paths import DEFAULT_PIPELINE, PRETRAINED


@pytest.fixture(scope="module")
def pipeline() -> D3PMPipeline:
    pipeline = D3PMPipeline.from_pretrained(DEFAULT_PIPELINE)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.mark.slow
class TestShippedCheckpoint:
    def test_samples_are_read_as_the_requested_digits(self, pipeline):
        labels = torch.arange(10).repeat_interleave(3)
        images = pipeline(labels, num_inference_steps=10, generator=torch.Generator().manual_seed(0), output_type="pt")
        predictions, _ = classify(load_classifier(), images.images)
        accuracy = (predictions == labels).float().mean().item()
        assert accuracy >= 0.8, f"shipped checkpoint reads as its label only {accuracy:.0%} of the time"

    def test_metadata_describes_the_training_run(self):
        training = json.loads((DEFAULT_PIPELINE / "training.json").read_text())
        assert training["config"]["transition_type"] == "gaussian" and training["train_seconds"] > 0


def read(pipeline, label, deltas, count=20):
    """Classifier predictions and confidences of ``count`` samples of ``label`` with ``deltas`` composed."""
    images = pipeline(
        [label] * count,
        unet_parameters=compose_parameters(pipeline.unet, deltas),
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    return classify(load_classifier(), images)


@pytest.mark.slow
class TestShippedDeltas:
    def test_the_default_delta_erases_nine_into_clean_anchor_digits(self, pipeline):
        nine = ConceptDelta.load(PRETRAINED / "deltas" / "separable" / "digit-9.safetensors")
        anchor = anchors_of(nine.hyperparameters)[9][0]
        predictions, confidence = read(pipeline, 9, [nine])
        assert (predictions != 9).all() and (predictions == anchor).float().mean() >= 0.9
        assert confidence.mean() > 0.85
        null_predictions, _ = read(pipeline, 10, [nine])
        # The base model's null label draws 9 in 17% of samples (≈ 3 of 20); 20 samples cannot resolve the ≤ 1%
        # target (benchmarks/erasure_ship.py measures it at 100), so allow one.
        assert (null_predictions == 9).sum() <= 1

    def test_erasing_the_anchor_too_moves_the_label_on(self, pipeline):
        nine = ConceptDelta.load(PRETRAINED / "deltas" / "separable" / "digit-9.safetensors")
        anchor = anchors_of(nine.hyperparameters)[9][0]
        partner = ConceptDelta.load(PRETRAINED / "deltas" / "separable" / f"digit-{anchor}.safetensors")
        predictions, confidence = read(pipeline, 9, [nine, partner])
        assert not torch.isin(predictions, torch.tensor([9, anchor])).any() and confidence.mean() > 0.85

    def test_every_pair_of_shipped_deltas_carries_its_pair_term(self, pipeline):
        deltas = [ConceptDelta.load(PRETRAINED / "deltas" / "separable" / f"digit-{d}.safetensors") for d in range(10)]
        hashes = [increment_hash(delta) for delta in deltas]
        for digit, delta in enumerate(deltas):  # each term fitted against its partner's shipped increments
            assert all(stored_term(delta, deltas[d], hashes[d]) is not None for d in range(10) if d != digit)
        two, six = deltas[2], deltas[6]
        with_term = compose_parameters(pipeline.unet, [two, six])
        without = compose_parameters(pipeline.unet, [without_pair_terms(delta) for delta in (two, six)])
        assert any(name not in without or not torch.equal(value, without[name]) for name, value in with_term.items())
