"""Composition and strength sweep of shipped deltas (DESIGN §6 interference), at the default sampler settings.

    OMP_NUM_THREADS=1 python benchmarks/erasure_compose.py --method separable --matrix --samples 100 \
        --output benchmarks/results/erasure-separable-matrix.json
    OMP_NUM_THREADS=1 python benchmarks/erasure_compose.py --method separable --digit 9 \
        --strengths 0 0.25 0.5 0.75 1 --samples 100 --output benchmarks/results/erasure-separable-strength-9.json

* matrix (``--matrix``): every pair {a, b} of digits erased by composing their deltas: the rate of every digit
  among label-a, label-b and null-label samples (so a digit leaking into the other's label shows), and how far
  label b's keys/values are from the base model's once b is restored (its delta dropped);
* pairs: for each partner b, the deltas of ``--digit`` a and b composed by addition; the rate of a among label-a
  samples, of b among label-b samples, of each among null-label samples; then b restored (its delta dropped):
  label b's accuracy (should return to the base model's) and label a's rate (should stay erased);
* sweep: the delta of a at each strength s (θ₀ + s Δ): rate of a among label-a and null-label samples, and the
  accuracy of the neighbours (`benchmarks/erasure.py` NEIGHBOURS);
* attack: the concept-inversion attack (`d3pm_hub.erasure.attack`) against the base model (``base``) and the
  shipped deltas of each ``--attack-methods`` folder, snapshotting the learnt tokens at each ``--attack-budgets``
  step count; success = rate of a among ``--attack-samples`` samples drawn with them; ``steps_to_50`` the first
  budget reaching 50%.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from d3pm_hub import D3PMPipeline
from d3pm_hub.deltas import ConceptDelta, compose_parameters
from d3pm_hub.erasure import attacked_parameters, concept_inversion_attack
from d3pm_hub.erasure.anchors import context_token_table
from d3pm_hub.evaluation import load_classifier
from d3pm_hub.evaluation.classifier import predict_proba
from d3pm_hub.evaluation.metrics import sample_images
from d3pm_hub.paths import DEFAULT_PIPELINE, PRETRAINED
from d3pm_hub.pipeline import DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_INFERENCE_STEPS

NULL = 10


def predictions(pipeline, classifier, parameters, labels, samples) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Label → (predicted digits, confidences) of ``samples`` images per label drawn with ``parameters``."""
    call = (lambda **kw: pipeline(**kw, unet_parameters=parameters)) if parameters else pipeline
    images, image_labels = sample_images(
        call, labels, samples, DEFAULT_NUM_INFERENCE_STEPS, DEFAULT_GUIDANCE_SCALE, seed=0
    )
    probs = predict_proba(classifier, images)
    return {
        label: (probs[image_labels == label].argmax(1), probs[image_labels == label].max(1).values) for label in labels
    }


def rate(result, label, digit) -> float:
    return (result[label][0] == digit).float().mean().item()


def histogram(result, label) -> list[float]:
    """Rate of each digit 0..9 among ``label``'s samples."""
    return (torch.bincount(result[label][0], minlength=10).float() / len(result[label][0])).tolist()


def pair_row(pipeline, classifier, delta, a, b, samples) -> dict:
    """Digits {a, b} erased together: what labels a, b and the null label draw; b's keys/values after restoring it."""
    composed = compose_parameters(pipeline.unet, [delta[a], delta[b]])
    result = predictions(pipeline, classifier, composed, [a, b, NULL], samples)
    alone = compose_parameters(pipeline.unet, [delta[a]])  # b restored: its keys/values should be the base's
    base = dict(pipeline.unet.named_parameters())
    tokens = context_token_table(base)[0][b].T.float()
    change = max((alone[name] @ tokens - base[name].detach() @ tokens).abs().max().item() for name in alone)
    return {
        "label_a": histogram(result, a),
        "label_b": histogram(result, b),
        "null": histogram(result, NULL),
        "confidence_a": result[a][1].mean().item(),
        "confidence_b": result[b][1].mean().item(),
        "restore_b_max_key_value_change": change,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="separable")
    parser.add_argument("--digit", type=int, default=9)
    parser.add_argument("--matrix", action="store_true", help="all 45 pairs of digits")
    parser.add_argument("--partners", type=int, nargs="*", default=[])
    parser.add_argument("--strengths", type=float, nargs="*", default=[])
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--attack-methods", nargs="*", default=[])
    parser.add_argument("--attack-budgets", type=int, nargs="*", default=[25, 50, 100, 200, 400, 1000])
    parser.add_argument("--attack-samples", type=int, default=20)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    from erasure import NEIGHBOURS  # benchmarks/erasure.py

    pipeline = D3PMPipeline.from_pretrained(DEFAULT_PIPELINE)
    pipeline.set_progress_bar_config(disable=True)
    classifier = load_classifier()
    folder = PRETRAINED / "deltas" / args.method
    wanted = {args.digit, *args.partners} if args.partners or args.strengths else set()
    delta = {
        d: ConceptDelta.load(folder / f"digit-{d}.safetensors")
        for d in wanted | (set(range(10)) if args.matrix else set())
    }
    a, n = args.digit, args.samples
    report = {"args": vars(args), "matrix": {}, "pairs": {}, "sweep": {}, "attack": {}}
    output = Path(args.output)
    for first, second in itertools.combinations(range(10) if args.matrix else [], 2):
        row = pair_row(pipeline, classifier, delta, first, second, n)
        report["matrix"][f"{first}+{second}"] = row
        output.write_text(json.dumps(report, indent=1))
        print("matrix", first, second, json.dumps(row), flush=True)
    for b in args.partners:
        both = predictions(
            pipeline, classifier, compose_parameters(pipeline.unet, [delta[a], delta[b]]), [a, b, NULL], n
        )
        restored = predictions(pipeline, classifier, compose_parameters(pipeline.unet, [delta[a]]), [b], n)
        row = {
            "rate_a": rate(both, a, a),
            "rate_b": rate(both, b, b),
            "null_rate_a": rate(both, NULL, a),
            "null_rate_b": rate(both, NULL, b),
            "confidence_a": both[a][1].mean().item(),
            "confidence_b": both[b][1].mean().item(),
            "restored_b_accuracy": rate(restored, b, b),
        }
        report["pairs"][str(b)] = row
        output.write_text(json.dumps(report, indent=1))
        print("pair", a, b, json.dumps(row), flush=True)
    neighbours = list(NEIGHBOURS.get(a, ()))
    for strength in args.strengths:
        parameters = compose_parameters(pipeline.unet, [(delta[a], strength)]) if strength else None
        result = predictions(pipeline, classifier, parameters, [a, NULL, *neighbours], n)
        row = {
            "rate": rate(result, a, a),
            "confidence": result[a][1].mean().item(),
            "null_rate": rate(result, NULL, a),
            "neighbour_accuracy": {d: rate(result, d, d) for d in neighbours},
        }
        report["sweep"][str(strength)] = row
        output.write_text(json.dumps(report, indent=1))
        print("strength", strength, json.dumps(row), flush=True)
    for method in args.attack_methods:
        parameters = None
        if method != "base":
            parameters = compose_parameters(
                pipeline.unet, [ConceptDelta.load(PRETRAINED / "deltas" / method / f"digit-{a}.safetensors")]
            )
        started = time.perf_counter()
        result = concept_inversion_attack(pipeline, a, tuple(args.attack_budgets), parameters)
        success = {}
        for budget, tokens in sorted(result.tokens.items()):
            attacked = attacked_parameters(pipeline, a, tokens, parameters)
            success[budget] = rate(predictions(pipeline, classifier, attacked, [a], args.attack_samples), a, a)
        reached = [budget for budget, value in success.items() if value >= 0.5]
        row = {
            "success": success,
            "steps_to_50": reached[0] if reached else None,
            "attack_seconds": result.seconds,
            "total_seconds": time.perf_counter() - started,
        }
        report["attack"][method] = row
        output.write_text(json.dumps(report, indent=1))
        print("attack", method, json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
