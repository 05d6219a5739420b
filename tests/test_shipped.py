"""The shipped checkpoint: a broken or mis-trained one must not ship silently (slow: real weights)."""

import json

import pytest
import torch

from d3pm_hub import D3PMPipeline
from d3pm_hub.evaluation import classify, load_classifier
from d3pm_hub.paths import DEFAULT_PIPELINE


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
