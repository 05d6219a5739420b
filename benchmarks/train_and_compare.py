"""Train D3PMs with equal time budgets, evaluate each, then train the best setting longer and sweep its sampler.

    python benchmarks/train_and_compare.py --output-dir runs/compare --seconds 50 --final-seconds 200

Writes ``results.json`` after every stage (a run cut short still reports what it finished) and the final
pipeline to ``{output_dir}/final/pipeline``. Used on the lent GPU (see BENCHMARKS.md) and runnable on CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from sampler_sweep import evaluate_settings  # noqa: E402  (a sibling script in benchmarks/)

from d3pm_hub.evaluation.classifier import load_classifier
from d3pm_hub.evaluation.metrics import real_reference
from d3pm_hub.pipeline import D3PMPipeline
from d3pm_hub.training import TrainConfig, train


def evaluate(
    pipeline_dir: Path,
    classifier,
    reference,
    device,
    samples: int,
    steps: int,
    guidance: float,
    temperature: float = 1.0,
) -> dict:
    pipeline = D3PMPipeline.from_pretrained(pipeline_dir).to(device)
    return evaluate_settings(pipeline, classifier, reference, samples, steps, guidance, temperature)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument(
        "--configs", nargs="+", default=["uniform:hybrid", "gaussian:hybrid", "absorbing:hybrid", "uniform:ce"]
    )
    parser.add_argument("--seconds", type=float, default=50)
    parser.add_argument("--final-seconds", type=float, default=200)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--mixed-precision", default="bf16" if torch.cuda.is_available() else "no")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {
        "machine": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
        "args": vars(args),
        "comparison": [],
        "final": None,
        "sweep": [],
    }

    def write():
        (output_dir / "results.json").write_text(json.dumps(results, indent=2))
        print(json.dumps(results["comparison"][-1:] + results["sweep"][-1:]), flush=True)

    classifier = load_classifier().to("cpu")
    reference = real_reference(classifier)

    def run(name: str, transition: str, loss: str, seconds: float) -> tuple[Path, dict]:
        config = TrainConfig(
            output_dir=str(output_dir / name),
            transition_type=transition,
            loss_type=loss,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            max_steps=10**6,
            max_train_seconds=seconds,
            mixed_precision=args.mixed_precision,
            checkpointing_steps=0,
            log_steps=100,
        )
        started = time.perf_counter()
        losses = train(config)
        seconds_taken = time.perf_counter() - started
        stats = {
            "name": name,
            "transition_type": transition,
            "loss_type": loss,
            "steps": len(losses),
            "train_seconds": round(seconds_taken, 1),
            "images_per_second": round(len(losses) * args.batch_size / seconds_taken, 1),
        }
        pipeline_dir = output_dir / name / "pipeline"
        stats["eval"] = evaluate(pipeline_dir, classifier, reference, device, args.samples, 25, 2.0)
        return pipeline_dir, stats

    for spec in args.configs:
        transition, loss = spec.split(":")
        _, stats = run(f"{transition}-{loss}", transition, loss, args.seconds)
        results["comparison"].append(stats)
        write()

    def score(stats):  # accuracy bar first, then the FD ratio
        e = stats["eval"]
        return (e["mean_accuracy"] >= 0.98 and e["min_class_accuracy"] >= 0.95, -e["fd_ratio"])

    best = max(results["comparison"], key=score)
    final_dir, final_stats = run("final", best["transition_type"], best["loss_type"], args.final_seconds)
    results["final"] = final_stats
    write()
    if not args.sweep:
        return
    for steps, guidance, temperature in [
        (10, 2.0, 1.0),
        (50, 2.0, 1.0),
        (100, 2.0, 1.0),
        (250, 2.0, 1.0),
        (25, 1.0, 1.0),
        (25, 3.0, 1.0),
        (25, 5.0, 1.0),
        (25, 2.0, 0.8),
        (25, 2.0, 0.6),
        (1000, 2.0, 1.0),
    ]:
        results["sweep"].append(
            evaluate(final_dir, classifier, reference, device, args.samples, steps, guidance, temperature)
        )
        write()


if __name__ == "__main__":
    main()
