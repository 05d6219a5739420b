"""Erasure benchmark: every method erases one digit from the shipped pipeline; efficacy, specificity, attack.

    OMP_NUM_THREADS=1 python benchmarks/erasure.py --digit 9 --samples-per-label 100 \
        --attack-budgets 25 50 100 200 400 1000 --attack-samples 50 --output benchmarks/results/erasure-9.json

For each method (and the base model): the delta is made (wall time on this machine), every label 0..9 and the
null label is sampled with it applied (`~d3pm_hub.deltas.compose_parameters` → ``unet_parameters``) and read
by the shipped classifier (`~d3pm_hub.evaluation.evaluate_pipeline`, DESIGN.md §6). Optionally the
concept-inversion attack (`~d3pm_hub.erasure.attack`) is run at each step budget and its samples classified.
Prints a Markdown leaderboard and writes every number to ``--output`` (JSON). The helpers here (`load_models`,
`predictions`, `rate`, `histogram`) are shared by the other erasure benchmarks.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from d3pm_hub import D3PMPipeline
from d3pm_hub.deltas import ConceptDelta, compose_parameters
from d3pm_hub.erasure import (
    METHODS,
    InferenceTimeErasurePipeline,
    attacked_parameters,
    concept_inversion_attack,
    parse_hyperparameters,
)
from d3pm_hub.evaluation import evaluate_pipeline, load_classifier, real_reference
from d3pm_hub.evaluation.classifier import DigitClassifier, predict_proba
from d3pm_hub.evaluation.metrics import sample_images
from d3pm_hub.paths import DEFAULT_PIPELINE, PRETRAINED
from d3pm_hub.pipeline import DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_INFERENCE_STEPS

NULL = 10
NEIGHBOURS = {9: (4, 7), 4: (9,), 7: (9, 1), 3: (5, 8), 5: (3, 6), 8: (3, 9)}

# Benchmark hyper-parameters for the shipped model (one short sweep on CPU; see BENCHMARKS.md, "Concept erasure").
SETTINGS: dict[str, dict] = {
    "naive": dict(steps=150, learning_rate=1e-4, batch_size=32),
    "esd-x": dict(steps=150, learning_rate=1e-3, alpha=1.0),
    "esd-u": dict(steps=150, learning_rate=3e-4, alpha=1.0),
    "esd-full": dict(steps=150, learning_rate=3e-4, alpha=1.0),
    "esd-x-kl": dict(steps=150, learning_rate=1e-3, alpha=1.0),
    "esd-u-preserve": dict(steps=150, learning_rate=3e-4, alpha=1.0),
    "closed-form": dict(),
    "sepme": dict(steps=300, learning_rate=3e-3, alpha=1.0),
    "separable": dict(null_alpha=1.0, steps=100, learning_rate=3e-3, batch_size=16),
}


def summarise(result: dict, digit: int, base: dict | None) -> dict:
    """The leaderboard numbers of one `evaluate_pipeline` result for erased ``digit``."""
    others = [d for d in range(10) if d != digit]
    accuracy = result["per_class_accuracy"]
    row = {
        "erased_label_rate": result["confusion"][digit][digit],
        "erased_label_becomes": result["confusion"][digit],
        "erased_label_confidence": result["per_class_confidence"][digit],
        "erased_label_fd_as_read": result["fd_as_read_per_class"][digit],
        "null_rate": result["null_digit_rates"][digit],
        "other_digits_accuracy": sum(accuracy[d] for d in others) / len(others),
        "other_digits_min_accuracy": min(accuracy[d] for d in others),
        "neighbour_accuracy": {str(d): accuracy[d] for d in NEIGHBOURS.get(digit, ())},
        "other_digits_fd": sum(result["fd_per_class"][d] for d in others) / len(others),
    }
    if base is not None:
        row["max_accuracy_drop"] = max(base["per_class_accuracy"][d] - accuracy[d] for d in others)
    return row


def load_models(model: str = str(DEFAULT_PIPELINE)) -> tuple[D3PMPipeline, DigitClassifier]:
    """The pipeline (progress bar off) and the shipped classifier."""
    pipeline = D3PMPipeline.from_pretrained(model)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline, load_classifier()


def predictions(
    pipeline,
    classifier,
    parameters,
    labels,
    samples,
    num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    seed: int = 0,
    batch_size: int | None = None,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Label → (predicted digits, confidences) of ``samples`` images per label drawn with ``parameters`` (in calls
    of ``batch_size``: see `sample_images`)."""
    images, image_labels = sample_images(
        pipeline,
        labels,
        samples,
        num_inference_steps,
        guidance_scale,
        seed=seed,
        batch_size=batch_size,
        unet_parameters=parameters,
    )
    probs = predict_proba(classifier, images)
    return {
        label: (probs[image_labels == label].argmax(1), probs[image_labels == label].max(1).values) for label in labels
    }


def rate(result, label, digit) -> float:
    """Rate of ``digit`` among ``label``'s samples in a `predictions` result."""
    return (result[label][0] == digit).float().mean().item()


def histogram(result, label) -> list[float]:
    """Rate of each digit 0..9 among ``label``'s samples."""
    return (torch.bincount(result[label][0], minlength=10).float() / len(result[label][0])).tolist()


def make_delta(pipeline, name: str, digit: int, model: str) -> ConceptDelta:
    """The delta of method ``name`` for ``digit``: made now with `SETTINGS`, or ``shipped:{method}`` from
    ``pretrained/deltas/{method}/digit-{digit}.safetensors``."""
    if name.startswith("shipped:"):
        return ConceptDelta.load(PRETRAINED / "deltas" / name.removeprefix("shipped:") / f"digit-{digit}.safetensors")
    return METHODS[name](pipeline, [digit], base_model=model, **SETTINGS[name])


def add_attack_arguments(parser: argparse.ArgumentParser) -> None:
    """The sampler and attack options that `attack` reads from its ``args``."""
    parser.add_argument("--num-inference-steps", type=int, default=DEFAULT_NUM_INFERENCE_STEPS)
    parser.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE_SCALE)
    parser.add_argument("--attack-learning-rate", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)


def attack(pipeline, classifier, digit, parameters, budgets, samples, args) -> dict:
    """Attack success (classifier rate of ``digit``) at each step budget, and the seconds spent."""
    result = concept_inversion_attack(pipeline, digit, budgets, parameters, args.attack_learning_rate)
    success = {}
    for budget, tokens in result.tokens.items():
        attacked = attacked_parameters(pipeline, digit, tokens, parameters)
        sampled = predictions(
            pipeline, classifier, attacked, [digit], samples, args.num_inference_steps, args.guidance_scale, args.seed
        )
        success[budget] = rate(sampled, digit, digit)
    return {"success": success, "seconds": result.seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_PIPELINE))
    parser.add_argument("--digit", type=int, default=9)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["base", "inference-switch", "inference-negative", *METHODS],
        help="method names; 'a+b' composes the deltas of methods a and b; 'shipped:m' loads the shipped m delta",
    )
    parser.add_argument("--samples-per-label", type=int, default=100)
    parser.add_argument("--attack-budgets", type=int, nargs="*", default=[])
    parser.add_argument("--attack-samples", type=int, default=20)
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="METHOD:KEY=VALUE",
        help="override a method's SETTINGS, e.g. esd-u-preserve:preserve_weight=3",
    )
    add_attack_arguments(parser)
    parser.add_argument("--output", default="benchmarks/results/erasure.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for assignment in args.set:
        method, _, value = assignment.partition(":")
        if method not in SETTINGS or not value:
            parser.error(f"--set takes METHOD:KEY=VALUE with METHOD one of {sorted(SETTINGS)}, got {assignment!r}.")
        SETTINGS[method] = SETTINGS[method] | parse_hyperparameters([value])

    pipeline, classifier = load_models(args.model)
    reference = real_reference(classifier)
    settings = dict(num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale)
    report = {"args": vars(args), "torch_threads": torch.get_num_threads(), "methods": {}}
    base = None
    for method in args.methods:
        started = time.perf_counter()
        parameters, sampler = None, pipeline
        if method.startswith("inference"):
            scale = 1.0 if method == "inference-negative" else 0.0
            sampler = InferenceTimeErasurePipeline.wrap(pipeline, [args.digit], negative_scale=scale)
        elif method != "base":
            deltas = [make_delta(pipeline, name, args.digit, args.model) for name in method.split("+")]
            parameters = compose_parameters(pipeline.unet, deltas)
        erase_seconds = time.perf_counter() - started
        result = evaluate_pipeline(
            sampler,
            classifier,
            args.samples_per_label,
            reference=reference,
            seed=args.seed,
            unet_parameters=parameters,
            **settings,
        )
        row = summarise(result, args.digit, base)
        row["erase_seconds"] = erase_seconds
        row["sampling_seconds"] = result["sampling_seconds"]
        if args.attack_budgets and not method.startswith("inference"):
            row["attack"] = attack(
                pipeline, classifier, args.digit, parameters, args.attack_budgets, args.attack_samples, args
            )
        base = result if method == "base" else base
        report["methods"][method] = {"summary": row, "evaluation": result}
        print(method, json.dumps({k: v for k, v in row.items() if k != "erased_label_becomes"}), flush=True)
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=1))
    print(leaderboard(report, args.digit))


def leaderboard(report: dict, digit: int) -> str:
    """A Markdown table of the summaries in ``report`` (the attack's table: `benchmarks/erasure_report.py`)."""
    neighbours = NEIGHBOURS.get(digit, ())
    header = (
        f"| method | rate of {digit} (erased label) | confidence | FD as read | becomes | "
        f"rate of {digit} (null label) | other digits acc. | max drop | "
        + " | ".join(f"acc. {d}" for d in neighbours)
        + " | FD others | erase s |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for method, entry in report["methods"].items():
        row = entry["summary"]
        becomes = sorted(enumerate(row["erased_label_becomes"]), key=lambda item: -item[1])[:2]
        drop = row.get("max_accuracy_drop")
        cells = [
            method,
            f"{row['erased_label_rate']:.3f}",
            f"{row['erased_label_confidence']:.3f}",
            f"{row['erased_label_fd_as_read']:.2f}",
            ", ".join(f"{d}:{r:.2f}" for d, r in becomes if r),
            f"{row['null_rate']:.3f}",
            f"{row['other_digits_accuracy']:.3f}",
            "-" if drop is None else f"{drop:+.3f}",
            *(f"{row['neighbour_accuracy'][str(d)]:.3f}" for d in neighbours),
            f"{row['other_digits_fd']:.2f}",
            f"{row['erase_seconds']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
