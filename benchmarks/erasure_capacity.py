"""Would more capacity for the null label close the pairs? One on-policy round per capacity, then its null samples.

    OMP_NUM_THREADS=1 python benchmarks/erasure_capacity.py --folder pretrained/deltas/separable --set 7+8 \
        --capacities null null+shared full --samples 1600 --seed 2 --output benchmarks/results/erasure-capacity-7-8.json

A pair's null label can only be edited through its two context tokens' keys/values (what the deltas store). Each
capacity fits one on-policy correction on top of the composed deltas (pair term included), on the states the
pair's null-label samples visit, to the pair's target (`~d3pm_hub.erasure.on_policy.fit_corrections`):

* ``null``: the null label's keys/values, decoupled: what a further targeted round can do (the control);
* ``null+shared``: every ``attn2.to_k/to_v`` without decoupling; for the null label that frees the two shared
  tokens' keys/values too, as a base with four null-label tokens would;
* ``full``: every UNet weight but the label path: no limit on what the null label computes (the ceiling).
  ``--ranks`` also samples it truncated to each rank, ``--fit-rank`` fits it at one rank (an image-path pair term's
  size, `d3pm_hub.erasure.interactions`).

The wider corrections move the other labels too, so they cannot ship as decoupled increments. ``--label-samples N``
also samples N images of every label with and without each correction (seed 0): how far a pair term with that
capacity would move the labels. If the rate of the erased digits falls with capacity, a base with more label tokens
is the lever; if not even ``full`` brings it down, capacity is not what holds the pair back.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from erasure import NULL, histogram, load_models, predictions, rate  # benchmarks/erasure.py
from erasure_null_matrix import add_null_sampling_arguments, load_folder

from d3pm_hub.deltas import compose_parameters
from d3pm_hub.erasure.common import frozen_copy
from d3pm_hub.erasure.interactions import low_rank_factors
from d3pm_hub.erasure.on_policy import RoundSettings, fit_corrections, null_target_settings

CAPACITIES = {"null": ("context", True), "null+shared": ("context", False), "full": ("full", False)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", required=True, help="holds digit-{0..9}.safetensors with their pair terms")
    parser.add_argument("--set", required=True, help="the erased pair, e.g. 7+8")
    parser.add_argument("--capacities", nargs="+", choices=CAPACITIES, default=list(CAPACITIES))
    parser.add_argument("--steps", type=int, default=267, help="Adam steps of the round")
    parser.add_argument("--learning-rate", type=float, default=1.5e-3, help="of the key/value corrections")
    parser.add_argument("--full-learning-rate", type=float, default=1e-4, help="of the 'full' correction")
    parser.add_argument("--trajectories", type=int, default=128)
    parser.add_argument("--round-seed", type=int, default=50)
    parser.add_argument("--label-samples", type=int, default=0, help="images of every label 0-9, seed 0")
    parser.add_argument(
        "--ranks", type=int, nargs="*", default=[], help="also sample the 'full' correction truncated to these ranks"
    )
    parser.add_argument("--fit-rank", type=int, help="fit the 'full' correction at this rank")
    add_null_sampling_arguments(parser, samples=1600, seed=2)
    args = parser.parse_args()
    pipeline, classifier = load_models()
    folder = load_folder(args.folder)
    deltas = [folder[int(digit)] for digit in args.set.split("+")]
    composed = compose_parameters(pipeline.unet, deltas)
    base = {name: parameter.detach() for name, parameter in pipeline.unet.named_parameters()}
    frozen = frozen_copy(pipeline)
    target = null_target_settings(deltas) | {"combine": "mixture"}
    report = {"args": vars(args), "null_label": {}}
    if args.label_samples:
        report["label_accuracy"] = {"without": label_accuracy(pipeline, classifier, composed, args.label_samples)}
    for capacity in args.capacities:
        parameter_set, decouple = CAPACITIES[capacity]
        settings = RoundSettings(
            steps=args.steps,
            learning_rate=args.full_learning_rate if parameter_set == "full" else args.learning_rate,
            trajectories=args.trajectories,
            seed=args.round_seed,
        )
        fit_rank = args.fit_rank if parameter_set == "full" else None
        corrections, kl, seconds = fit_corrections(
            pipeline, frozen, [deltas], [deltas], settings, target, parameter_set, decouple, fit_rank
        )
        if fit_rank is not None:
            capacity = f"{capacity}, fitted at rank {fit_rank}"
        ranks = [None] + (args.ranks if parameter_set == "full" else [])
        for rank in ranks:
            truncated = {name: low_rank(value.cpu(), rank) for name, value in corrections[0].items()}
            correction = {name: value for name, (value, _) in truncated.items()}
            parameters = composed | {name: composed.get(name, base[name]) + value for name, value in correction.items()}
            result = predictions(
                pipeline, classifier, parameters, [NULL], args.samples, seed=args.seed, batch_size=args.batch_size
            )
            row = {"rates": histogram(result, NULL), "confidence": result[NULL][1].mean().item()}
            key = capacity if rank is None else f"{capacity}, rank {rank}"
            size = sum(low_rank(value, rank or fit_rank)[1] for value in corrections[0].values())
            report["null_label"][key] = row | {"held_out_kl": kl[0], "seconds": seconds, "values": size}
            if args.label_samples:
                report["label_accuracy"][key] = label_accuracy(pipeline, classifier, parameters, args.label_samples)
            Path(args.output).write_text(json.dumps(report, indent=1))
            rates = [round(row["rates"][delta.concepts[0]], 4) for delta in deltas]
            print(args.set, key, "KL", kl[0], "rates", rates, round(row["confidence"], 3), size, flush=True)


def low_rank(increment: torch.Tensor, rank: int | None) -> tuple[torch.Tensor, int]:
    """``increment`` truncated to its top ``rank`` singular directions (`low_rank_factors`; ``None``: unchanged),
    and how many numbers store it: what a pair term of that rank would add."""
    if rank is None:
        return increment, increment.numel()
    up, down = low_rank_factors(increment, rank)
    return (up @ down).reshape(increment.shape), up.numel() + down.numel()


def label_accuracy(pipeline, classifier, parameters, samples: int) -> list[float]:
    """Each label's rate of its own digit among ``samples`` images drawn with ``parameters`` (seed 0)."""
    labels = list(range(pipeline.unet.null_label))
    result = predictions(pipeline, classifier, parameters, labels, samples, batch_size=100)
    return [rate(result, label, label) for label in labels]


if __name__ == "__main__":
    main()
