"""Model cards: rendered from the measurement files only, deterministic, and checked for staleness."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from d3pm_hub.cards import base_card, check_cards_up_to_date, delta_card, expected_cards, stale_cards, write_cards
from d3pm_hub.deltas import ConceptDelta

from .conftest import tiny_pipeline

TO_K = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"

EVALUATION = {
    "num_samples": 1000,
    "num_null_samples": 100,
    "per_class_accuracy": [0.99, 1.0, 0.98, 0.97, 0.99, 0.96, 1.0, 0.98, 0.95, 0.9731],
    "mean_accuracy": 0.98131,
    "min_class_accuracy": 0.95,
    "per_class_confidence": [0.991, 0.995, 0.982, 0.97, 0.99, 0.96, 0.999, 0.98, 0.95, 0.97],
    "mean_confidence": 0.9787,
    "confusion": [[1.0 if row == col else 0.0 for col in range(10)] for row in range(10)],
    "fd_per_class": [12.5, 8.25, 20.0, 15.5, 14.0, 18.0, 11.0, 13.0, 22.0, 16.0],
    "fd_overall": 7.4321,
    "fd_floor_per_class": [3.0] * 10,
    "fd_floor_overall": 1.2345,
    "null_digit_rates": [0.1, 0.11, 0.09, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1],
    "fd_null": 9.9,
    "num_inference_steps": 25,
    "guidance_scale": 2.0,
    "samples_per_label": 100,
    "seed": 0,
    "batch_size": None,
    "sampling_seconds": 321.0,
}
TRAINING = {"command": "python training/train.py --max-seconds 660", "hardware": "2 CPU cores", "seconds": 661.4}
DELTA_METRICS = {"erased_digit_rate": 0.0071, "attack": {"success_rate_50_steps": 0.42}, "per_digit": [0.1, 0.2]}


def shipped_layout(root: Path) -> Path:
    """``root/pretrained`` with a tiny base pipeline (eval.json, training.json) and one delta, like the repo's."""
    pretrained = root / "pretrained"
    pipeline = tiny_pipeline()
    pipeline.save_pretrained(pretrained / "d3pm-mnist")
    (pretrained / "d3pm-mnist" / "eval.json").write_text(json.dumps(EVALUATION))
    (pretrained / "d3pm-mnist" / "training.json").write_text(json.dumps(TRAINING))
    increment = torch.zeros_like(pipeline.unet.get_parameter(TO_K)).index_fill_(1, torch.tensor([0]), 0.25)
    delta = ConceptDelta.create(
        pipeline.unet, {TO_K: increment}, [9], "closed-form", {"ridge": 0.1}, metrics=DELTA_METRICS
    )
    delta.metadata["created"] = "2026-01-02T03:04:05+00:00"
    delta.save(pretrained / "deltas" / "closed-form" / "digit-9.safetensors")
    return pretrained


def test_base_card_holds_the_measured_numbers(tmp_path):
    folder = shipped_layout(tmp_path) / "d3pm-mnist"
    card = ModelCard(str(base_card(folder, repo_id="org/d3pm-mnist")))
    results = {(r.metric_name, r.metric_value) for r in card.data.eval_results}
    assert ("Mean per-class accuracy (digit classifier)", EVALUATION["mean_accuracy"]) in results
    assert ("Classifier-feature Fréchet distance to real digits", EVALUATION["fd_overall"]) in results
    assert ("Accuracy of samples of digit 9", 0.9731) in results
    for text in ("0.981", "7.43", "1.23", "0.973", "0.950", TRAINING["command"], "661.4", "org/d3pm-mnist"):
        assert text in card.text, text
    parameters = sum(p.numel() for p in tiny_pipeline().unet.parameters())
    assert f"{parameters:,}" in card.text


def test_delta_card_holds_metadata_and_metrics(tmp_path):
    path = shipped_layout(tmp_path) / "deltas" / "closed-form" / "digit-9.safetensors"
    delta = ConceptDelta.load(path)
    card = ModelCard(str(delta_card(delta, path_in_repo="deltas/closed-form/digit-9.safetensors")))
    assert {(r.metric_type, r.metric_value) for r in card.data.eval_results} == {
        ("erased_digit_rate", 0.0071),
        ("attack.success_rate_50_steps", 0.42),
    }
    assert card.data.base_model is None  # a local delta names no Hub base until it is pushed
    for text in ("closed-form", "0.0071", "0.42", "0.1, 0.2", "ridge", delta.metadata["base_model_hash"]):
        assert text in card.text, text
    delta.metadata.update(base_model="org/d3pm-mnist", base_revision="a" * 40)
    pushed = ModelCard(str(delta_card(delta, path_in_repo="deltas/closed-form/digit-9.safetensors")))
    assert pushed.data.base_model == "org/d3pm-mnist" and 'revision="' + "a" * 40 in pushed.text


def test_delta_card_says_what_an_anchored_label_draws():
    pipeline = tiny_pipeline()
    increment = torch.zeros_like(pipeline.unet.get_parameter(TO_K))
    anchors = {9: [1, 6, 0]}
    delta = ConceptDelta.create(pipeline.unet, {TO_K: increment}, [9], "separable", {"anchors": anchors})
    card = str(delta_card(delta, path_in_repo="deltas/separable/digit-9.safetensors"))
    assert "draws clean digits of 1 instead" in card and "| anchors | 9: 1, 6, 0 |" in card


def test_rendering_is_deterministic(tmp_path):
    pretrained = shipped_layout(tmp_path)
    first = expected_cards(pretrained)
    assert sorted(path.relative_to(pretrained).as_posix() for path in first) == [
        "d3pm-mnist/README.md",
        "deltas/closed-form/digit-9.md",
    ]
    assert expected_cards(pretrained) == first


def test_stale_card_check_fails_when_a_metric_changes(tmp_path):
    pretrained = shipped_layout(tmp_path)
    with pytest.raises(AssertionError, match="d3pm-hub cards"):
        check_cards_up_to_date(pretrained)  # not rendered yet
    assert len(write_cards(pretrained)) == 2
    check_cards_up_to_date(pretrained)
    assert write_cards(pretrained) == []

    eval_path = pretrained / "d3pm-mnist" / "eval.json"
    eval_path.write_text(json.dumps({**EVALUATION, "mean_accuracy": 0.5}))
    assert stale_cards(pretrained) == [pretrained / "d3pm-mnist" / "README.md"]
    delta_path = pretrained / "deltas" / "closed-form" / "digit-9.safetensors"
    delta = ConceptDelta.load(delta_path)
    delta.metadata["metrics"] = json.dumps({**DELTA_METRICS, "erased_digit_rate": 0.5})
    delta.save(delta_path)
    with pytest.raises(AssertionError, match="digit-9.md"):
        check_cards_up_to_date(pretrained)
    write_cards(pretrained)
    check_cards_up_to_date(pretrained)


def test_base_card_needs_measurements(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path / "unmeasured")
    with pytest.raises(FileNotFoundError, match="d3pm-hub eval"):
        base_card(tmp_path / "unmeasured")


def test_committed_cards_are_up_to_date():
    """CI fails here when a shipped measurement changed and `d3pm-hub cards` was not run."""
    check_cards_up_to_date()
