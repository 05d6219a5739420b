"""Train the digit classifier used by the metrics and ship it.

    python training/train_classifier.py                      # → pretrained/classifier/
    python training/train_classifier.py --epochs 10 --output-dir outputs/classifier

Writes ``config.json`` + ``diffusion_pytorch_model.safetensors`` and a ``metrics.json`` with the held-out
accuracy, the command and the training seconds. The logic lives in ``d3pm_hub.evaluation.classifier``.
"""

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

from d3pm_hub.evaluation.classifier import DEFAULT_CLASSIFIER_PATH, train_classifier

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_CLASSIFIER_PATH)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--num-levels", type=int, default=32, help="grey levels of the training images")
    parser.add_argument("--source", default="embedded", choices=["embedded", "hub", "auto"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    classifier, metrics = train_classifier(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        num_levels=args.num_levels,
        source=args.source,
        seed=args.seed,
    )
    classifier.save_pretrained(args.output_dir)
    metrics["command"] = shlex.join(["python", *sys.argv])
    (args.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
