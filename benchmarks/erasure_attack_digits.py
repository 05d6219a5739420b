"""Concept-inversion attack against the shipped delta of every digit, and against the base model for comparison.

    OMP_NUM_THREADS=1 python benchmarks/erasure_attack_digits.py --digits 0 1 2 3 4 --budgets 50 100 200 \
        --samples 30 --output benchmarks/results/erasure-separable-attack-digits-0-4.json

For each digit d: fresh label tokens are optimised on real images of d (`benchmarks/erasure.py` `attack`, the same
settings as the leaderboard's attack table) against the base model and against the base model with
``pretrained/deltas/{method}/digit-{d}.safetensors`` applied; success at each budget is the classifier's rate of d
among ``--samples`` images drawn with the learnt tokens.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from erasure import add_attack_arguments, attack, load_models  # benchmarks/erasure.py

from d3pm_hub.deltas import ConceptDelta, compose_parameters
from d3pm_hub.paths import PRETRAINED


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="separable")
    parser.add_argument("--digits", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--budgets", type=int, nargs="+", default=[50, 100, 200])
    parser.add_argument("--samples", type=int, default=30)
    add_attack_arguments(parser)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    pipeline, classifier = load_models()
    report = {"args": vars(args), "digits": {}}
    for digit in args.digits:
        delta = ConceptDelta.load(PRETRAINED / "deltas" / args.method / f"digit-{digit}.safetensors")
        erased = compose_parameters(pipeline.unet, [delta])
        report["digits"][str(digit)] = {
            "base": attack(pipeline, classifier, digit, None, args.budgets, args.samples, args),
            args.method: attack(pipeline, classifier, digit, erased, args.budgets, args.samples, args),
        }
        Path(args.output).write_text(json.dumps(report, indent=1))
        print(digit, json.dumps(report["digits"][str(digit)]), flush=True)


if __name__ == "__main__":
    main()
