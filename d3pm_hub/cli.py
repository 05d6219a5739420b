"""``d3pm-hub`` command line: train, sample (and more verbs as the library grows)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import torch
from diffusers.utils import make_image_grid

from .paths import DEFAULT_PIPELINE


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One ``--field-name`` option per dataclass field, typed from its default."""
    for item in dataclasses.fields(cls):
        default = item.default
        flag = "--" + item.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, tuple):
            parser.add_argument(flag, type=int, nargs="+", default=default)
        elif default is None:
            parser.add_argument(flag, type=float if "seconds" in item.name else str, default=None)
        else:
            parser.add_argument(flag, type=type(default), default=default)


def config_from_args(cls, args: argparse.Namespace):
    values = {item.name: getattr(args, item.name) for item in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def command_train(args: argparse.Namespace) -> None:
    from .training import TrainConfig, train

    train(config_from_args(TrainConfig, args))


def command_sample(args: argparse.Namespace) -> None:
    from .pipeline import D3PMPipeline

    pipeline = D3PMPipeline.from_pretrained(args.model)
    digits = [d for d in args.digits for _ in range(args.per_digit)]
    generator = torch.Generator().manual_seed(args.seed)
    images = pipeline(
        digits, num_inference_steps=args.steps, guidance_scale=args.guidance_scale, generator=generator
    ).images
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    make_image_grid(images, rows=len(args.digits), cols=args.per_digit).resize(
        (28 * args.per_digit * 4, 28 * len(args.digits) * 4), resample=0
    ).save(output)
    print(f"Wrote {len(images)} samples to {output}")


def build_parser() -> argparse.ArgumentParser:
    from .pipeline import DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_INFERENCE_STEPS
    from .training import TrainConfig

    parser = argparse.ArgumentParser(prog="d3pm-hub", description=__doc__)
    verbs = parser.add_subparsers(dest="command", required=True)

    train_parser = verbs.add_parser("train", help="train a D3PM (also: accelerate launch training/train.py)")
    add_dataclass_arguments(train_parser, TrainConfig)
    train_parser.set_defaults(func=command_train)

    sample_parser = verbs.add_parser("sample", help="write a PNG grid of samples of chosen digits")
    sample_parser.add_argument("--model", default=str(DEFAULT_PIPELINE), help="folder or Hub repo id")
    sample_parser.add_argument("--digits", type=int, nargs="+", default=list(range(10)))
    sample_parser.add_argument("--per-digit", type=int, default=8)
    sample_parser.add_argument("--steps", type=int, default=DEFAULT_NUM_INFERENCE_STEPS)
    sample_parser.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE_SCALE)
    sample_parser.add_argument("--seed", type=int, default=0)
    sample_parser.add_argument("--output", default="samples.png")
    sample_parser.set_defaults(func=command_sample)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
