"""CPU cost: training throughput (images/s) and sampling seconds per 100 images at several step counts.

    python benchmarks/cpu_speed.py --output benchmarks/results/cpu_speed.json

Timings on a shared 2-core machine vary (up to 4× with load); the load average is recorded beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from d3pm_hub.paths import DEFAULT_PIPELINE
from d3pm_hub.pipeline import D3PMPipeline
from d3pm_hub.training import TrainConfig, train


def training_images_per_second(steps: int, batch_size: int) -> float:
    """Images/s of the shipped architecture's training loop (hybrid loss, fp32), after one warm-up step."""
    with tempfile.TemporaryDirectory() as folder:
        config = TrainConfig(
            output_dir=folder, transition_type="gaussian", batch_size=batch_size, max_steps=1, checkpointing_steps=0
        )
        train(config)
        started = time.perf_counter()
        train(TrainConfig(**{**config.__dict__, "output_dir": folder + "/timed", "max_steps": steps}))
        return steps * batch_size / (time.perf_counter() - started)


def sampling_seconds_per_100(pipeline: D3PMPipeline, steps: int, guidance_scale: float) -> float:
    """Seconds to sample 100 images (10 of each digit) in one batch."""
    labels = torch.arange(10).repeat(10)
    started = time.perf_counter()
    pipeline(
        labels,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50, 100])
    args = parser.parse_args()
    pipeline = D3PMPipeline.from_pretrained(DEFAULT_PIPELINE)
    pipeline.set_progress_bar_config(disable=True)
    results = {
        "torch_threads": torch.get_num_threads(),
        "load_average_before": os.getloadavg()[0],
        "sampling": [],
        "training_images_per_second": None,
    }
    for steps in args.steps:
        for guidance in (1.0, 2.0):  # without guidance, and with it (twice the batch)
            seconds = sampling_seconds_per_100(pipeline, steps, guidance)
            results["sampling"].append({"steps": steps, "guidance_scale": guidance, "seconds_per_100_images": seconds})
            print(json.dumps(results["sampling"][-1]), flush=True)
    results["training_images_per_second"] = training_images_per_second(args.train_steps, args.batch_size)
    results["load_average_after"] = os.getloadavg()[0]
    Path(args.output).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
