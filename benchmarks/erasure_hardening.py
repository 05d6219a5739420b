"""A quick screen of image-path hardening: the shipped delta of a digit composed with an `esd-u-preserve` delta.

    OMP_NUM_THREADS=1 python benchmarks/erasure_hardening.py --digit 9 --labels 4 8 --samples 400 \
        --set preserve_weight=3 loss=kl --attack-budgets 1000 --output benchmarks/results/erasure-hardening-kl.json
    OMP_NUM_THREADS=1 python benchmarks/erasure_hardening.py --base --labels 4 8 --samples 400 --output …

`benchmarks/erasure.py` measures every label of such a composition (``--methods
shipped:separable+esd-u-preserve``); at 400 samples per label that is half an hour of sampling per setting. The
cost of the image-path edit falls on the digits that share the erased digit's strokes (4 and 8 for 9, BENCHMARKS
§2), so this screen samples only ``--labels`` (same seeds as `erasure.py`), the erased label and the null label,
and runs the concept-inversion attack. ``--set`` overrides `erasure.py`'s ``esd-u-preserve`` settings; ``--base``
measures the base model instead, for the drops.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from erasure import NULL, SETTINGS, add_attack_arguments, attack, load_models, make_delta, predictions, rate

from d3pm_hub.deltas import compose_parameters
from d3pm_hub.erasure import METHODS, parse_hyperparameters
from d3pm_hub.paths import DEFAULT_PIPELINE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--digit", type=int, default=9)
    parser.add_argument("--labels", type=int, nargs="+", default=[4, 8], help="digits whose accuracy to measure")
    parser.add_argument("--samples", type=int, default=400, help="images per label")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="esd-u-preserve settings")
    parser.add_argument("--base", action="store_true", help="measure the base model instead")
    parser.add_argument("--attack-budgets", type=int, nargs="*", default=[1000])
    parser.add_argument("--attack-samples", type=int, default=50)
    add_attack_arguments(parser)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    pipeline, classifier = load_models()
    settings = SETTINGS["esd-u-preserve"] | parse_hyperparameters(args.set)
    started = time.perf_counter()
    parameters = None
    if not args.base:
        shipped = make_delta(pipeline, "shipped:separable", args.digit, str(DEFAULT_PIPELINE))
        hardening = METHODS["esd-u-preserve"](pipeline, [args.digit], base_model=str(DEFAULT_PIPELINE), **settings)
        parameters = compose_parameters(pipeline.unet, [shipped, hardening])
    erase_seconds = time.perf_counter() - started
    labels = [*args.labels, args.digit, NULL]
    result = predictions(
        pipeline, classifier, parameters, labels, args.samples, args.num_inference_steps, args.guidance_scale, args.seed
    )
    row = {
        "settings": None if args.base else settings,
        "erase_seconds": erase_seconds,
        "accuracy": {str(label): rate(result, label, label) for label in args.labels},
        "erased_label_rate": rate(result, args.digit, args.digit),
        "erased_label_confidence": result[args.digit][1].mean().item(),
        "null_rate": rate(result, NULL, args.digit),
    }
    print(json.dumps(row), flush=True)
    if args.attack_budgets:
        row["attack"] = attack(
            pipeline, classifier, args.digit, parameters, args.attack_budgets, args.attack_samples, args
        )
    Path(args.output).write_text(json.dumps({"args": vars(args), "result": row}, indent=1))
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
