"""Composition and strength sweep of shipped deltas (DESIGN §6 interference), at the default sampler settings.

    OMP_NUM_THREADS=1 python benchmarks/erasure_compose.py --method separable --matrix --samples 100 \
        --output benchmarks/results/erasure-separable-matrix.json
    # or in n processes: --part i --parts n for i in 0..n-1, then erasure_report.py --matrix with every output
    OMP_NUM_THREADS=1 python benchmarks/erasure_compose.py --method separable --digit 9 \
        --strengths 0 0.25 0.5 0.75 1 --samples 100 --output benchmarks/results/erasure-separable-strength-9.json

* matrix (``--matrix``): every pair {a, b} of digits erased by composing their deltas: the rate of every digit
  among label-a, label-b and null-label samples (so a digit leaking into the other's label shows), and how far
  label b's keys/values are from the base model's once b is restored (its delta dropped);
* sweep: the delta of a at each strength s (θ₀ + s Δ): rate of a among label-a and null-label samples, and the
  accuracy of the neighbours (`benchmarks/erasure.py` NEIGHBOURS).

The concept-inversion attack is measured by `benchmarks/erasure.py --attack-budgets`.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from erasure import NEIGHBOURS, NULL, histogram, load_models, predictions, rate  # benchmarks/erasure.py

from d3pm_hub.deltas import ConceptDelta, compose_parameters
from d3pm_hub.erasure.anchors import context_token_table
from d3pm_hub.paths import PRETRAINED


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
    parser.add_argument("--strengths", type=float, nargs="*", default=[])
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--folder", help="holds digit-{d}.safetensors (default: pretrained/deltas/{method})")
    parser.add_argument("--part", type=int, default=0, help="with --parts n: measure every n-th pair from this one")
    parser.add_argument("--parts", type=int, default=1)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    pipeline, classifier = load_models()
    folder = Path(args.folder) if args.folder else PRETRAINED / "deltas" / args.method
    digits = range(10) if args.matrix else [args.digit]
    delta = {d: ConceptDelta.load(folder / f"digit-{d}.safetensors") for d in digits}
    a, n = args.digit, args.samples
    report = {"args": vars(args), "matrix": {}, "sweep": {}}
    output = Path(args.output)
    pairs = list(itertools.combinations(range(10) if args.matrix else [], 2))
    for first, second in pairs[args.part :: args.parts]:
        row = pair_row(pipeline, classifier, delta, first, second, n)
        report["matrix"][f"{first}+{second}"] = row
        output.write_text(json.dumps(report, indent=1))
        print("matrix", first, second, json.dumps(row), flush=True)
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


if __name__ == "__main__":
    main()
