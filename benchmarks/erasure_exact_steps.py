"""Where a composition's null label goes wrong: its exact target at some sampler steps, its deltas at the others.

    OMP_NUM_THREADS=1 python benchmarks/erasure_exact_steps.py --folder pretrained/deltas/separable --set 2+6 \
        --windows 715-1000 358-643 1-286 --output benchmarks/results/erasure-exact-steps-2-6.json

For each window lo-hi, ``--samples`` null-label images with the set's deltas composed, except that at the default
sampler's steps with lo ≤ t ≤ hi the x0 prediction is the edit's target itself (`erased_null_target` of the frozen
base model: what the deltas are distilled towards) rather than the edited model's. 0-0 is the deltas alone (the
null matrix's cell, same samples at the same ``--seed``), 0-1000 the exact target at every step
(`erasure_targets.py`). The window whose exact steps bring the rate down to the exact target's is where the
distillation error that lets the digit back lies (`PairSettings.refine_timesteps`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from erasure import NULL, load_models, predictions, rate  # benchmarks/erasure.py
from erasure_null_matrix import add_null_sampling_arguments, load_folder

from d3pm_hub.deltas import compose_parameters
from d3pm_hub.erasure.on_policy import erased_null_target, null_target_settings
from d3pm_hub.pipeline import D3PMPipeline


class ExactStepsPipeline(D3PMPipeline):
    """A pipeline whose x0 prediction is the exact erased null-label target (from its own, base, UNet) at the steps
    with ``window[0] ≤ t ≤ window[1]`` and the given weights' prediction elsewhere (null label only)."""

    def configure(self, digits: list[int], target: dict, window: tuple[int, int]) -> ExactStepsPipeline:
        self.digits, self.target, self.window = digits, target, window
        return self

    def x0_log_probs(self, sample, timestep, class_labels, guidance_scale, unet=None) -> torch.Tensor:
        if not self.window[0] <= int(timestep) <= self.window[1]:
            return super().x0_log_probs(sample, timestep, class_labels, guidance_scale, unet)
        timesteps = torch.full((len(sample),), int(timestep), device=sample.device)
        logits = erased_null_target(self.unet, sample, timesteps, self.digits, self.target)
        return torch.log_softmax(logits.double(), dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", required=True, help="holds digit-{0..9}.safetensors")
    parser.add_argument("--set", required=True, help="the erased set, e.g. 2+6")
    parser.add_argument("--windows", nargs="+", default=["0-0", "0-1000"], help="lo-hi of t, inclusive")
    add_null_sampling_arguments(parser, samples=400, seed=0)
    args = parser.parse_args()
    pipeline, classifier = load_models()
    digits = [int(digit) for digit in args.set.split("+")]
    deltas = [load_folder(args.folder)[digit] for digit in digits]
    parameters = compose_parameters(pipeline.unet, deltas)
    hybrid = ExactStepsPipeline(unet=pipeline.unet, scheduler=pipeline.scheduler)
    hybrid.set_progress_bar_config(disable=True)
    report = {"args": vars(args), "rates": {}}
    for window in args.windows:
        low, high = (int(value) for value in window.split("-"))
        hybrid.configure(digits, null_target_settings(deltas), (low, high))
        result = predictions(
            hybrid, classifier, parameters, [NULL], args.samples, seed=args.seed, batch_size=args.batch_size
        )
        report["rates"][window] = [rate(result, NULL, digit) for digit in digits]
        Path(args.output).write_text(json.dumps(report, indent=1))
        print(window, report["rates"][window], flush=True)


if __name__ == "__main__":
    main()
