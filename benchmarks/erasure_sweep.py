"""Hyper-parameter sweep of one erasure method on the shipped pipeline: where the benchmark's defaults come from.

    OMP_NUM_THREADS=1 python benchmarks/erasure_sweep.py --method esd-x --digit 9 --samples 30 \
        --grid learning_rate=3e-4,1e-3,3e-3 alpha=1,3 --output benchmarks/results/sweep-esd-x.json

Every combination of the ``--grid`` values (on top of ``SETTINGS[method]`` in ``benchmarks/erasure.py``) makes a
delta for ``--digit`` and samples, at the default sampler settings, ``--samples`` images of the erased label,
the null label and the digit's neighbours. Printed and written per combination: the erased digit's rate among
label and null samples, the label samples' confidence, the neighbours' accuracy and the seconds to erase.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

from erasure import NEIGHBOURS, NULL, SETTINGS, load_models, predictions, rate  # benchmarks/erasure.py

from d3pm_hub.deltas import compose_parameters
from d3pm_hub.erasure import METHODS, parse_hyperparameters


def grid_points(assignments: list[str]) -> list[dict]:
    """``["lr=1,2", "alpha=3"]`` → every combination as a dict of parsed values."""
    axes = [(key, values.split(",")) for key, _, values in (a.partition("=") for a in assignments)]
    return [
        parse_hyperparameters([f"{key}={value}" for (key, _), value in zip(axes, values, strict=True)])
        for values in itertools.product(*(values for _, values in axes))
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", required=True, choices=sorted(METHODS))
    parser.add_argument("--digit", type=int, default=9)
    parser.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2")
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    pipeline, classifier = load_models()
    digit, neighbours = args.digit, list(NEIGHBOURS.get(args.digit, ()))
    report = {"args": vars(args), "points": []}
    for point in grid_points(args.grid):
        settings = {**SETTINGS[args.method], **point}
        started = time.perf_counter()
        delta = METHODS[args.method](pipeline, [digit], **settings)
        seconds = time.perf_counter() - started
        parameters = compose_parameters(pipeline.unet, [delta])
        result = predictions(pipeline, classifier, parameters, [digit, NULL, *neighbours], args.samples)
        row = {
            "settings": settings,
            "rate": rate(result, digit, digit),
            "confidence": result[digit][1].mean().item(),
            "null_rate": rate(result, NULL, digit),
            "null_confidence": result[NULL][1].mean().item(),
            "neighbour_accuracy": {d: rate(result, d, d) for d in neighbours},
            "erase_seconds": seconds,
            "steps_run": delta.metrics.get("steps_run"),
        }
        report["points"].append(row)
        Path(args.output).write_text(json.dumps(report, indent=1))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
