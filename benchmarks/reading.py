"""How well the model reads its own samples (`~d3pm_hub.erasure.reading.read_digits`), as focused rounds use it.

    cd benchmarks && OMP_NUM_THREADS=1 python reading.py --real 1000 --timesteps 250 500 750 \
        --folder ../pretrained/deltas/separable --sets 7+8 1+8 --samples 400 --output results/reading.json

Two numbers against the shipped classifier (the measuring stick, never used in training):

* accuracy on ``--real`` digits of the embedded test split, noised once at each of ``--timesteps``;
* for each of ``--sets`` composed from ``--folder``'s deltas, ``--samples`` null-label samples (seed ``--seed``):
  how many the classifier reads as an erased digit, how many the model reads so, and how many both do (the
  recall and precision of the failures a focused round draws its batches from).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from erasure import NULL, load_models  # benchmarks/erasure.py
from erasure_null_matrix import load_folder

from d3pm_hub.data import dataset_to_tensors, load_mnist
from d3pm_hub.deltas import compose_parameters
from d3pm_hub.erasure.reading import read_digits
from d3pm_hub.evaluation.classifier import predict_proba
from d3pm_hub.evaluation.metrics import sample_images
from d3pm_hub.pipeline import DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_INFERENCE_STEPS


def real_accuracy(pipeline, count: int, timestep: int, seed: int) -> float:
    """Share of the first ``count`` embedded test digits that `read_digits` reads as their label."""
    images, labels = dataset_to_tensors(load_mnist("embedded", "test"), pipeline.scheduler.config.num_classes)
    generator = torch.Generator().manual_seed(seed)
    read = read_digits(pipeline.unet, pipeline.scheduler, images[:count], generator, timestep=timestep)
    return (read == labels[:count]).double().mean().item()


def failures(pipeline, classifier, deltas, digits: list[int], samples: int, seed: int) -> dict:
    """Null-label samples with ``digits``' deltas composed, read by the classifier and by the model."""
    parameters = compose_parameters(pipeline.unet, [deltas[d] for d in digits])
    call = lambda **kw: pipeline(**kw, unet_parameters=parameters)  # noqa: E731
    images, _ = sample_images(
        call, [NULL], samples, DEFAULT_NUM_INFERENCE_STEPS, DEFAULT_GUIDANCE_SCALE, seed=seed, batch_size=100
    )
    levels = torch.round(images * (pipeline.scheduler.config.num_classes - 1)).long()
    by_classifier = torch.isin(predict_proba(classifier, images).argmax(1), torch.tensor(digits))
    read = read_digits(pipeline.unet, pipeline.scheduler, levels, torch.Generator().manual_seed(seed))
    by_model = torch.isin(read, torch.tensor(digits))
    both = int((by_classifier & by_model).sum())
    return {"classifier": int(by_classifier.sum()), "model": int(by_model.sum()), "both": both}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", type=int, default=1000)
    parser.add_argument("--timesteps", type=int, nargs="*", default=[500])
    parser.add_argument("--folder", help="holds digit-{0..9}.safetensors (with --sets)")
    parser.add_argument("--sets", nargs="*", default=[], help="erased sets, e.g. 7+8")
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    pipeline, classifier = load_models()
    report = {"args": vars(args), "real_accuracy": {}, "failures": {}}
    for timestep in args.timesteps:
        report["real_accuracy"][str(timestep)] = real_accuracy(pipeline, args.real, timestep, args.seed)
        Path(args.output).write_text(json.dumps(report, indent=1))
        print("t =", timestep, "accuracy", round(report["real_accuracy"][str(timestep)], 3), flush=True)
    deltas = load_folder(args.folder) if args.sets else {}
    for text in args.sets:
        digits = [int(digit) for digit in text.split("+")]
        report["failures"][text] = failures(pipeline, classifier, deltas, digits, args.samples, args.seed)
        Path(args.output).write_text(json.dumps(report, indent=1))
        print(text, report["failures"][text], flush=True)


if __name__ == "__main__":
    main()
