"""Sample the null label under the class-posterior target with digits removed, at inference time.

    OMP_NUM_THREADS=1 python benchmarks/erasure_posterior.py --sets 9 2+6 --sharpness 1 3 30 \
        --output benchmarks/results/erasure-posterior-targets.json

For each set S and sharpness γ (and negative guidance β, ``--betas``), every sampler step replaces the null label's x0
distribution with `~d3pm_hub.erasure.posterior.null_label_target` computed from the frozen model's eleven
predictions (`~d3pm_hub.erasure.posterior.class_posterior` weights). That is the distribution a ``separable`` delta
with ``null_target="posterior"`` is distilled towards, sampled without distillation error. Reports the rate of every
digit among the null samples (read by the shipped classifier) and their mean confidence; ``-`` is S = ∅ (the
mixture that the weights reconstruct, to compare with the null label itself).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from erasure import NULL, histogram, load_models, predictions  # benchmarks/erasure.py

from d3pm_hub.erasure.posterior import class_posterior, null_label_target
from d3pm_hub.pipeline import D3PMPipeline


class PosteriorTargetPipeline(D3PMPipeline):
    """A pipeline whose x0 distribution is the null-label target of ``erased`` (whatever label is asked for)."""

    erased: tuple[int, ...] = ()
    sharpness: float = 1.0
    beta: float = 0.0

    def x0_log_probs(self, sample, timestep, class_labels, guidance_scale, unet=None) -> torch.Tensor:
        null = self.unet.config.num_labels
        log_probs = [
            super(PosteriorTargetPipeline, self).x0_log_probs(
                sample, timestep, torch.full_like(class_labels, label), 1.0 if label < null else 0.0, unet
            )
            for label in range(null + 1)
        ]
        log_labels, log_null = torch.stack(log_probs[:-1]), log_probs[-1]
        posterior = class_posterior(log_null, log_labels)
        erased = list(self.erased)
        target = null_label_target(log_null, log_labels, posterior, erased, self.beta, sharpness=self.sharpness)
        return torch.log_softmax(target, dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["9", "2+6"], help="digit sets, e.g. 2+6; - for none")
    parser.add_argument("--sharpness", type=float, nargs="+", default=[1.0, 3.0, 30.0])
    parser.add_argument("--betas", type=float, nargs="+", default=[0.0])
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    pipeline, classifier = load_models()
    sampler = PosteriorTargetPipeline(unet=pipeline.unet, scheduler=pipeline.scheduler)
    sampler.set_progress_bar_config(disable=True)
    report = {"args": vars(args), "null_label": {}}
    for erased in args.sets:
        sampler.erased = tuple(int(d) for d in erased.split("+")) if erased != "-" else ()
        for sharpness in args.sharpness:
            for beta in args.betas:
                sampler.sharpness, sampler.beta = sharpness, beta
                result = predictions(sampler, classifier, None, [NULL], args.samples)
                row = {"rates": histogram(result, NULL), "confidence": result[NULL][1].mean().item()}
                report["null_label"][f"{erased} gamma={sharpness:g} beta={beta:g}"] = row
                Path(args.output).write_text(json.dumps(report, indent=1))
                print(erased, sharpness, beta, [round(r, 2) for r in row["rates"]], round(row["confidence"], 3))


if __name__ == "__main__":
    main()
