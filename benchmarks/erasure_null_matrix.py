"""Null-label samples only, for every single delta and every pair of a folder's deltas (a fast composition check).

    OMP_NUM_THREADS=1 python benchmarks/erasure_null_matrix.py --folder pretrained/deltas/separable \
        --output benchmarks/results/erasure-null-matrix.json [--part 0 --parts 2]

Each of the 10 singles and 45 pairs (or each of ``--sets``, e.g. triples ``0+2+6``): ``--samples`` null-label
images (``--seed``, default 0; default sampler) with the deltas composed, read by the shipped classifier: the rate
of every digit and the mean confidence. ``benchmarks/erasure_compose.py --matrix`` measures the pairs' labels and
restores too, at about ten times the cost. ``--part i --parts n`` measures every n-th set from the i-th (run n
processes, then merge their ``null_label`` entries). ``--same-as RESULTS FOLDER`` re-measures a folder whose deltas
changed only in part (e.g. one digit's single rounds and its refitted pair terms): sets whose composed weights are
bitwise those of FOLDER's deltas would draw the same samples, so RESULTS' rows are copied for them (marked
``copied_from``).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
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
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (a fresh one re-checks cells chosen at 0)")
    parser.add_argument("--part", type=int, default=0)
    parser.add_argument("--parts", type=int, default=1)
    parser.add_argument("--sets", nargs="*", default=[], help="erase these sets instead, e.g. 0+2+6 (any size)")
    parser.add_argument(
        "--same-as",
        nargs=2,
        metavar=("RESULTS", "FOLDER"),
        help="copy RESULTS' row (measured on FOLDER's deltas at the same --samples, --batch-size and --seed) for "
        "each set whose composed weights are bitwise those of FOLDER's deltas, so only sets that changed are sampled",
    )
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    pipeline, classifier = load_models()
    deltas = load_folder(args.folder)
    earlier, earlier_deltas = {}, {}
    if args.same_as:
        earlier_report = json.loads(Path(args.same_as[0]).read_text())
        measured = [earlier_report["args"].get(key, 0) for key in ("samples", "batch_size", "seed")]
        if measured != [args.samples, args.batch_size, args.seed]:
            raise ValueError(f"{args.same_as[0]} was measured with other --samples, --batch-size or --seed.")
        earlier, earlier_deltas = earlier_report["null_label"], load_folder(args.same_as[1])
    sets = [(d,) for d in range(10)] + list(itertools.combinations(range(10), 2))
    if args.sets:
        sets = [tuple(int(digit) for digit in text.split("+")) for text in args.sets]
    report = {"args": vars(args), "null_label": {}}
    for erased in sets[args.part :: args.parts]:
        key = "+".join(map(str, erased))
        parameters = compose_parameters(pipeline.unet, [deltas[d] for d in erased])
        if key in earlier and same_weights(
            parameters, compose_parameters(pipeline.unet, [earlier_deltas[d] for d in erased])
        ):
            row = earlier[key] | {"copied_from": args.same_as[0]}
        else:
            result = predictions(
                pipeline, classifier, parameters, [NULL], args.samples, seed=args.seed, batch_size=args.batch_size
            )
            row = {"rates": histogram(result, NULL), "confidence": result[NULL][1].mean().item()}
        report["null_label"][key] = row
        Path(args.output).write_text(json.dumps(report, indent=1))
        print(erased, [round(row["rates"][d], 3) for d in erased], "copied" if "copied_from" in row else "", flush=True)


def add_null_sampling_arguments(parser: argparse.ArgumentParser, samples: int, seed: int) -> None:
    """``--samples``, ``--batch-size``, ``--seed`` and ``--output`` of the scripts that sample a set's null label."""
    parser.add_argument("--samples", type=int, default=samples)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=seed)
    parser.add_argument("--output", required=True)


def load_folder(folder: str) -> dict[int, ConceptDelta]:
    """The folder's ``digit-{d}.safetensors`` deltas by digit."""
    return {d: ConceptDelta.load(Path(folder) / f"digit-{d}.safetensors") for d in range(10)}


def same_weights(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    """Whether two composed parameter sets are bitwise equal (then seed-for-seed equal samples)."""
    return first.keys() == second.keys() and all(torch.equal(value, second[name]) for name, value in first.items())


if __name__ == "__main__":
    main()
