"""``d3pm-hub`` command line: train, sample, push/pull with the Hub, render model cards (more verbs to come)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import torch
from diffusers.utils import make_image_grid

from .paths import DEFAULT_PIPELINE, PRETRAINED, atomic_write_text


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


def _delta_files(paths: list[Path]) -> dict[str, Path] | list[Path]:
    """Delta files to push: a folder keeps its layout under ``deltas/``; single files are placed by metadata."""
    from .hub import DELTA_SUFFIX, DELTAS_FOLDER

    files: dict[str, Path] = {}
    singles = [path for path in paths if path.is_file()]
    for folder in (path for path in paths if path.is_dir()):
        for path in sorted(folder.glob(f"**/*{DELTA_SUFFIX}")):
            files[f"{DELTAS_FOLDER}/{path.relative_to(folder).as_posix()}"] = path
    if files and singles:
        raise SystemExit("Pass delta folders or delta files, not both.")
    return files or singles


def command_push(args: argparse.Namespace) -> None:
    from .hub import DELTAS_FOLDER, push_deltas, push_pipeline

    options = {"private": args.private, "token": args.token}
    commits = {"repo_id": args.repo_id}
    if not args.skip_pipeline:
        commits["pipeline_commit"] = push_pipeline(args.pipeline, args.repo_id, **options)
        print(f"Pushed pipeline {args.pipeline} to {args.repo_id}: commit {commits['pipeline_commit']}")
    if args.deltas is None:
        shipped = PRETRAINED / DELTAS_FOLDER
        args.deltas = [shipped] if shipped.is_dir() else []
    missing = [str(path) for path in args.deltas if not Path(path).exists()]
    if missing:
        raise SystemExit(f"No such delta file or folder: {', '.join(missing)}")
    deltas = _delta_files([Path(path) for path in args.deltas])
    if deltas:
        base_revision = commits.get("pipeline_commit") if args.base_repo_id in (None, args.repo_id) else None
        commits["deltas_commit"] = push_deltas(
            deltas, args.repo_id, base_repo_id=args.base_repo_id, base_revision=base_revision, **options
        )
        print(f"Pushed {len(deltas)} delta(s) to {args.repo_id}: commit {commits['deltas_commit']}")
    print(json.dumps(commits))


def command_pull(args: argparse.Namespace) -> None:
    from .hub import load_delta, resolve_folder
    from .pipeline import D3PMPipeline

    if not args.files:
        print(resolve_folder(args.repo_id, revision=args.revision))
        return
    base = D3PMPipeline.from_pretrained(args.base) if args.base else None
    for filename in args.files:
        delta = load_delta(args.repo_id, filename, revision=args.revision, pipeline=base)
        checked = "matches the base" if base is not None else "base not checked (pass --base)"
        summary = f"{delta.method} erasing digits {delta.concepts}, {delta.num_parameters():,} values"
        print(f"{filename}: {summary}, {checked}")


def command_cards(args: argparse.Namespace) -> None:
    from .cards import check_cards_up_to_date, write_cards

    if args.check:
        try:
            check_cards_up_to_date(args.pretrained)
        except AssertionError as error:
            raise SystemExit(str(error)) from None
        print("Model cards are up to date.")
        return
    written = write_cards(args.pretrained)
    print("\n".join(f"Wrote {path}" for path in written) or "Model cards already up to date.")


def add_hub_verbs(verbs) -> None:
    """``push``, ``pull`` and ``cards``: the Hub and model-card verbs."""
    push_parser = verbs.add_parser("push", help="push a pipeline and its deltas (with rendered cards) to the Hub")
    push_parser.add_argument("repo_id", help="org/name of the Hub model repo (created if needed)")
    push_parser.add_argument("--pipeline", default=str(DEFAULT_PIPELINE), help="saved pipeline folder")
    push_parser.add_argument(
        "--deltas", nargs="*", default=None, help="delta files or folders (default: the shipped deltas; none: skip)"
    )
    push_parser.add_argument("--skip-pipeline", action="store_true", help="push deltas only")
    push_parser.add_argument("--base-repo-id", default=None, help="repo of the deltas' base (default: repo_id)")
    push_parser.add_argument("--private", action="store_true", default=None)
    push_parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login)")
    push_parser.set_defaults(func=command_push)

    pull_parser = verbs.add_parser("pull", help="download a pipeline, or delta files, into the Hugging Face cache")
    pull_parser.add_argument("repo_id", help="org/name of the Hub model repo")
    pull_parser.add_argument("files", nargs="*", help="delta files in the repo (none: the pipeline)")
    pull_parser.add_argument("--revision", default=None, help="branch, tag or commit")
    pull_parser.add_argument("--base", default=None, help="refuse deltas not made for this pipeline (folder or id)")
    pull_parser.set_defaults(func=command_pull)

    cards_parser = verbs.add_parser("cards", help="render every model card beside the shipped weights")
    cards_parser.add_argument("--pretrained", default=str(PRETRAINED), help="folder of the shipped weights")
    cards_parser.add_argument("--check", action="store_true", help="fail if a committed card is stale")
    cards_parser.set_defaults(func=command_cards)


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer ≥ 1, got {value}")
    return value


def command_eval(args: argparse.Namespace) -> None:
    from .evaluation import evaluate_pipeline, format_table, load_classifier
    from .pipeline import D3PMPipeline

    pipeline = D3PMPipeline.from_pretrained(args.model)
    pipeline.set_progress_bar_config(disable=True)
    output_dir = Path(args.output_dir)
    result = evaluate_pipeline(
        pipeline,
        load_classifier(args.classifier),
        samples_per_label=args.samples_per_label,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        grid_path=output_dir / "samples.png",
    )
    result["model"] = str(args.model)
    table = format_table(result)
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / "eval.json", json.dumps(result, indent=2))
    atomic_write_text(output_dir / "eval.txt", table + "\n")
    print(table)
    print(f"Wrote {output_dir / 'eval.json'}, eval.txt and samples.png")


def build_parser() -> argparse.ArgumentParser:
    from .pipeline import DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_INFERENCE_STEPS
    from .training import TrainConfig

    parser = argparse.ArgumentParser(prog="d3pm-hub", description=__doc__)
    verbs = parser.add_subparsers(dest="command", required=True)

    train_parser = verbs.add_parser("train", help="train a D3PM (also: accelerate launch training/train.py)")
    add_dataclass_arguments(train_parser, TrainConfig)
    train_parser.set_defaults(func=command_train)

    def add_sampler_verb(name: str, help: str, func) -> argparse.ArgumentParser:
        verb = verbs.add_parser(name, help=help)
        verb.add_argument("--model", default=str(DEFAULT_PIPELINE), help="folder or Hub repo id")
        verb.add_argument("--steps", type=int, default=DEFAULT_NUM_INFERENCE_STEPS)
        verb.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE_SCALE)
        verb.add_argument("--seed", type=int, default=0)
        verb.set_defaults(func=func)
        return verb

    sample_parser = add_sampler_verb("sample", "write a PNG grid of samples of chosen digits", command_sample)
    sample_parser.add_argument("--digits", type=int, nargs="+", default=list(range(10)))
    sample_parser.add_argument("--per-digit", type=positive_int, default=8)
    sample_parser.add_argument("--output", default="samples.png")

    eval_parser = add_sampler_verb(
        "eval", "score a pipeline with the digit classifier (JSON, table, grid)", command_eval
    )
    eval_parser.add_argument("--classifier", default=None, help="classifier folder (default: the shipped one)")
    eval_parser.add_argument("--samples-per-label", type=positive_int, default=100)
    eval_parser.add_argument("--output-dir", default="eval")

    from .erasure import add_erase_arguments, run_erase

    erase_parser = verbs.add_parser("erase", help="erase digits and write delta(s) (also: training/erase.py)")
    add_erase_arguments(erase_parser)
    erase_parser.set_defaults(func=run_erase)

    add_hub_verbs(verbs)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
