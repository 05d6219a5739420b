"""Null-label samples only, for every single delta and every pair of a folder's deltas (a fast composition check).

    OMP_NUM_THREADS=1 python benchmarks/erasure_null_matrix.py --folder pretrained/deltas/separable \
        --output benchmarks/results/erasure-null-matrix.json [--part 0 --parts 2]

Each of the 10 singles and 45 pairs (or each of ``--sets``, e.g. triples ``0+2+6``): ``--samples`` null-label
images (seed 0, default sampler) with the deltas composed, read by the shipped classifier: the rate of every digit
and the mean confidence. ``benchmarks/erasure_compose.py --matrix`` measures the pairs' labels and restores too, at
about ten times the cost. ``--part i --parts n`` measures every n-th set from the i-th (run n processes, then merge
their ``null_label`` entries).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from erasure import NULL, histogram, load_models, predictions  # benchmarks/erasure.py

from d3pm_hub.deltas import ConceptDelta, compose_parameters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", required=True, help="holds digit-{0..9}.safetensors")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=100,
        help="images per sampler call; the first calls' samples do not depend on --samples (100 at a time is also "
        "faster on the CPU than one call of 500)",
    )
    parser.add_argument("--part", type=int, default=0)
    parser.add_argument("--parts", type=int, default=1)
    parser.add_argument("--sets", nargs="*", default=[], help="erase these sets instead, e.g. 0+2+6 (any size)")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    pipeline, classifier = load_models()
    deltas = {d: ConceptDelta.load(Path(args.folder) / f"digit-{d}.safetensors") for d in range(10)}
    sets = [(d,) for d in range(10)] + list(itertools.combinations(range(10), 2))
    if args.sets:
        sets = [tuple(int(digit) for digit in text.split("+")) for text in args.sets]
    report = {"args": vars(args), "null_label": {}}
    for erased in sets[args.part :: args.parts]:
        parameters = compose_parameters(pipeline.unet, [deltas[d] for d in erased])
        result = predictions(pipeline, classifier, parameters, [NULL], args.samples, batch_size=args.batch_size)
        row = {"rates": histogram(result, NULL), "confidence": result[NULL][1].mean().item()}
        report["null_label"]["+".join(map(str, erased))] = row
        Path(args.output).write_text(json.dumps(report, indent=1))
        print(erased, [round(row["rates"][d], 2) for d in erased], flush=True)


if __name__ == "__main__":
    main()
