"""Would timestep-dependent pair terms help? A composition's null label sampled with other deltas at some steps.

    OMP_NUM_THREADS=1 python benchmarks/erasure_window_terms.py --folder pretrained/deltas/separable --set 7+8 \
        --windows 715-1000=outputs/win-hi 358-643=outputs/win-mid 1-286=outputs/win-low \
        --samples 1600 --seed 2 --output benchmarks/results/erasure-window-terms-7-8.json

The pair terms of a delta are one increment of the null label's keys/values for every timestep. Each ``lo-hi=FOLDER``
here holds deltas whose term for the set was refined on that window's states only (``refine_timesteps=[lo,hi]``);
the null label is sampled with FOLDER's composed deltas at the default sampler's steps with lo ≤ t ≤ hi and with
``--folder``'s elsewhere. If the rate falls towards the exact target's where one window-wide term could not bring it,
what the null label's tokens can express at one timestep is not the limit, and a term per window of steps is a lever;
if it does not, more freedom over time is not one either.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from erasure import NULL, histogram, load_models, predictions  # benchmarks/erasure.py
from erasure_null_matrix import add_null_sampling_arguments, load_folder

from d3pm_hub.deltas import compose_parameters
from d3pm_hub.pipeline import D3PMPipeline
from d3pm_hub.unet import D3PMUNet


class WindowedPipeline(D3PMPipeline):
    """A pipeline that predicts x0 with ``unets[(lo, hi)]`` at the steps with lo ≤ t ≤ hi, and with the call's UNet
    elsewhere."""

    def configure(self, unets: dict[tuple[int, int], D3PMUNet]) -> WindowedPipeline:
        self.unets = unets
        return self

    def x0_log_probs(self, sample, timestep, class_labels, guidance_scale, unet=None) -> torch.Tensor:
        inside = [model for (low, high), model in self.unets.items() if low <= int(timestep) <= high]
        return super().x0_log_probs(sample, timestep, class_labels, guidance_scale, inside[0] if inside else unet)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", required=True, help="deltas used outside every window")
    parser.add_argument("--set", required=True, help="the erased set, e.g. 7+8")
    parser.add_argument("--windows", nargs="+", required=True, help="lo-hi=FOLDER: FOLDER's deltas at lo ≤ t ≤ hi")
    add_null_sampling_arguments(parser, samples=1600, seed=2)
    args = parser.parse_args()
    pipeline, classifier = load_models()
    digits = [int(digit) for digit in args.set.split("+")]

    def composed(folder: str) -> dict[str, torch.Tensor]:
        deltas = load_folder(folder)
        return compose_parameters(pipeline.unet, [deltas[digit] for digit in digits])

    unets = {}
    for window in args.windows:
        span, folder = window.split("=", 1)
        low, high = (int(value) for value in span.split("-"))
        unets[(low, high)] = pipeline.unet_with_parameters(composed(folder))
    windowed = WindowedPipeline(unet=pipeline.unet, scheduler=pipeline.scheduler).configure(unets)
    windowed.set_progress_bar_config(disable=True)
    result = predictions(
        windowed, classifier, composed(args.folder), [NULL], args.samples, seed=args.seed, batch_size=args.batch_size
    )
    row = {"rates": histogram(result, NULL), "confidence": result[NULL][1].mean().item()}
    Path(args.output).write_text(json.dumps({"args": vars(args), "null_label": {args.set: row}}, indent=1))
    print(args.set, [round(row["rates"][digit], 4) for digit in digits], round(row["confidence"], 3), flush=True)


if __name__ == "__main__":
    main()
