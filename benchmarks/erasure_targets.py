"""Which null-label target erases a *set* of digits: the sum of the digits' negative guidance terms, or their mixture.

    OMP_NUM_THREADS=1 python benchmarks/erasure_targets.py --sets 2+6 0+2 1+8 --scales 1 2 \
        --output benchmarks/results/erasure-targets.json
    OMP_NUM_THREADS=1 python benchmarks/erasure_targets.py --sets 0+7 2+6 1+8 --scales 2 --combine mixture \
        --samples 400 --batch-size 100 --output benchmarks/results/erasure-targets-400.json
    OMP_NUM_THREADS=1 python benchmarks/erasure_targets.py --sets 4+5 --scales 2 --combine sum --weights 4=0.5 \
        --samples 400 --batch-size 100 --output benchmarks/results/erasure-targets-400-weighted.json

Samples the base model's null label under inference-time negative guidance away from each set S
(`InferenceTimeErasurePipeline` with ``combine`` = sum or mixture and scale β — `guide_away`) at the default sampler
settings (``--batch-size`` images per call, as in `erasure_null_matrix.py`) and reads the samples with the shipped
classifier: the rate of each digit of S. ``--weights D=W`` multiplies digit D's term of the sum by W (others 1).
This is exactly the distribution the `separable` null-label edit is distilled towards (`joint_negative_guidance`,
mixture), sampled without any distillation error.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from erasure import NULL, load_models, predictions, rate  # benchmarks/erasure.py

from d3pm_hub.erasure import InferenceTimeErasurePipeline
from d3pm_hub.erasure.common import NEGATIVE_GUIDANCE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["2+6", "0+2", "1+8"], help="digit sets, e.g. 2+6")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--combine", nargs="+", choices=NEGATIVE_GUIDANCE, default=list(NEGATIVE_GUIDANCE))
    parser.add_argument("--weights", nargs="*", default=[], help="the sum's weight per digit, e.g. 4=0.5")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=None, help="images per sampler call (see sample_images)")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    pipeline, classifier = load_models()
    weights = {int(digit): float(weight) for digit, weight in (text.split("=") for text in args.weights)}
    report = {"args": vars(args), "rates": {}}
    for erased in args.sets:
        digits = [int(d) for d in erased.split("+")]
        for combine in args.combine:
            for scale in args.scales:
                weighted = [weights.get(d, 1.0) for d in digits] if weights and combine == "sum" else None
                guided = InferenceTimeErasurePipeline.wrap(
                    pipeline, digits, negative_scale=scale, combine=combine, weights=weighted
                )
                guided.set_progress_bar_config(disable=True)
                result = predictions(guided, classifier, None, [NULL], args.samples, batch_size=args.batch_size)
                rates = [rate(result, NULL, d) for d in digits]
                report["rates"].setdefault(erased, {}).setdefault(combine, {})[str(scale)] = rates
                Path(args.output).write_text(json.dumps(report, indent=1))
                print(erased, combine, scale, rates, flush=True)


if __name__ == "__main__":
    main()
