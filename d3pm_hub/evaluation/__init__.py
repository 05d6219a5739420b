"""Evaluation: an independent digit classifier and the sample-quality metrics built on it."""

from .classifier import DigitClassifier, load_classifier, train_classifier
from .metrics import (
    RealReference,
    classify,
    evaluate_images,
    evaluate_pipeline,
    features_and_logits,
    format_table,
    frechet_distance,
    real_reference,
    sample_images,
    save_grid,
)

__all__ = [
    "DigitClassifier",
    "RealReference",
    "classify",
    "evaluate_images",
    "evaluate_pipeline",
    "features_and_logits",
    "format_table",
    "frechet_distance",
    "load_classifier",
    "real_reference",
    "sample_images",
    "save_grid",
    "train_classifier",
]
