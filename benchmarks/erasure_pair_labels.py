"""Every label's accuracy while a pair's deltas are composed: how far an image-path pair term moves the labels.

    OMP_NUM_THREADS=1 python benchmarks/erasure_pair_labels.py --folder pretrained/deltas/separable --sets 7+8 2+6 \
        --samples 200 --output benchmarks/results/erasure-pair-labels.json

For each set, its deltas composed (pair terms included), then ``--samples`` images of every label 0-9 (seed 0) read
by the shipped classifier, beside the base model's at the same seeds. A pair term confined to the null label's keys
and values leaves the other labels' samples as the base model's; one on the image path (``refine_parameters="full"``,
`d3pm_hub.erasure.interactions`) moves them, and this says by how much.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from erasure import load_models  # benchmarks/erasure.py
from erasure_capacity import label_accuracy
from erasure_null_matrix import load_folder

from d3pm_hub.deltas import compose_parameters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", required=True, help="holds digit-{0..9}.safetensors with their pair terms")
    parser.add_argument("--sets", nargs="+", required=True, help="erased sets, e.g. 7+8")
    parser.add_argument("--samples", type=int, default=200, help="images of every label")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    pipeline, classifier = load_models()
    folder = load_folder(args.folder)
    report = {"args": vars(args), "base": label_accuracy(pipeline, classifier, None, args.samples), "sets": {}}
    for erased in args.sets:
        deltas = [folder[int(digit)] for digit in erased.split("+")]
        accuracy = label_accuracy(pipeline, classifier, compose_parameters(pipeline.unet, deltas), args.samples)
        report["sets"][erased] = accuracy
        Path(args.output).write_text(json.dumps(report, indent=1))
        changes = [round(after - before, 4) for before, after in zip(report["base"], accuracy, strict=True)]
        print(erased, "accuracy", [round(value, 4) for value in accuracy], "change from base", changes, flush=True)


if __name__ == "__main__":
    main()
