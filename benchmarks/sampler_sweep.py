"""Quality and speed of a pipeline across sampler settings (steps, guidance scale, temperature).

    python benchmarks/sampler_sweep.py --model pretrained/d3pm-mnist --output benchmarks/results/sampler_cpu.json \
        --settings 10:1.0:1.0 25:1.0:1.0 25:1.5:1.0

Each setting is ``steps:guidance:temperature``; every result is 100 samples per label (configurable), scored by
`d3pm_hub.evaluation.metrics.evaluate_pipeline`, with seconds per 100 images on this machine.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from d3pm_hub.evaluation.classifier import load_classifier
from d3pm_hub.evaluation.metrics import evaluate_pipeline, real_reference
from d3pm_hub.pipeline import D3PMPipeline


def summary(result: dict) -> dict:
    """The headline numbers of an evaluation result."""
    keys = ("mean_accuracy", "min_class_accuracy", "mean_confidence", "fd_overall", "fd_floor_overall")
    out = {k: result[k] for k in keys}
    out["fd_ratio"] = result["fd_overall"] / result["fd_floor_overall"]
    out["null_digit_rates"] = result["null_digit_rates"]
    out["sampling_seconds"] = result["sampling_seconds"]
    out["seconds_per_100_images"] = (
        100 * result["sampling_seconds"] / (result["num_samples"] + result["num_null_samples"])
    )
    return out


def evaluate_settings(
    pipeline: D3PMPipeline, classifier, reference, samples: int, steps: int, guidance: float, temperature: float = 1.0
) -> dict:
    """Headline numbers for one sampler setting."""
    pipeline.set_progress_bar_config(disable=True)
    result = evaluate_pipeline(
        pipeline,
        classifier,
        samples_per_label=samples,
        num_inference_steps=steps,
        guidance_scale=guidance,
        reference=reference,
        batch_size=samples,
        temperature=temperature,
    )
    return {**summary(result), "steps": steps, "guidance_scale": guidance, "temperature": temperature}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pretrained/d3pm-mnist")
    parser.add_argument("--output", required=True)
    parser.add_argument("--settings", nargs="+", default=["10:1.0:1.0", "25:1.0:1.0", "50:1.0:1.0"])
    parser.add_argument("--samples", type=int, default=100)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipeline = D3PMPipeline.from_pretrained(args.model).to(device)
    classifier = load_classifier()
    reference = real_reference(classifier)
    machine = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor()} x{torch.get_num_threads()}"
    results = {"machine": machine, "model": args.model, "samples_per_label": args.samples, "sweep": []}
    for setting in args.settings:
        steps, guidance, temperature = setting.split(":")
        results["sweep"].append(
            evaluate_settings(
                pipeline, classifier, reference, args.samples, int(steps), float(guidance), float(temperature)
            )
        )
        Path(args.output).write_text(json.dumps(results, indent=2))
        print(json.dumps(results["sweep"][-1]), flush=True)


if __name__ == "__main__":
    main()
