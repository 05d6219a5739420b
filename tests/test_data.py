"""MNIST loading (embedded / Hub / auto) and exact quantisation."""

import logging

import numpy as np
import pytest
import torch

from d3pm_hub.data import dataset_to_tensors, dequantize, hub_offline, load_mnist, quantize


def test_embedded_splits_are_disjoint_and_labelled():
    train, test = load_mnist("embedded", "train"), load_mnist("embedded", "test")
    assert (len(train), len(test), len(load_mnist("embedded", "all"))) == (4000, 1000, 5000)
    assert train.features["label"].names == [str(d) for d in range(10)]
    assert train[0]["image"].size == (28, 28) and train[0]["image"].mode == "L"
    train_pixels = {np.asarray(image).tobytes() for image in train["image"][:500]}
    assert not train_pixels & {np.asarray(image).tobytes() for image in test["image"]}


def test_quantisation_is_exactly_invertible_on_the_levels():
    for levels in (2, 8, 32, 256):
        grid = torch.arange(levels)
        assert torch.equal(quantize(dequantize(grid, levels), levels), grid)
    pixels = torch.arange(256, dtype=torch.uint8)
    assert (quantize(pixels, 32).diff() >= 0).all() and quantize(pixels, 32).max() == 31


def test_dataset_to_tensors_shapes():
    images, labels = dataset_to_tensors(load_mnist("embedded", "test"), 32)
    assert images.shape == (1000, 1, 28, 28) and images.dtype == torch.long and labels.shape == (1000,)
    assert images.min() >= 0 and images.max() == 31 and set(labels.tolist()) == set(range(10))


def test_hub_source_offline_fails_clearly_and_auto_falls_back(caplog):
    with pytest.raises(RuntimeError, match="source='embedded'"):
        load_mnist("hub", "test")
    with caplog.at_level(logging.WARNING):
        assert len(load_mnist("auto", "test")) == 1000
    assert "embedded" in caplog.text


@pytest.mark.parametrize(
    ("value", "offline"), [("1", True), ("yes", True), ("TRUE", True), ("0", False), ("false", False), ("", False)]
)
def test_hub_offline_reads_the_variable_as_huggingface_hub_does(monkeypatch, value, offline):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hub_offline() is offline


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="source"):
        load_mnist("kaggle")
    with pytest.raises(ValueError, match="split"):
        load_mnist("embedded", "validation")
