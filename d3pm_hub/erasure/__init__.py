"""Concept erasure: methods that turn a trained pipeline and digits into a `~d3pm_hub.deltas.ConceptDelta`.

Every method is ``erase_<method>(pipeline, digits, **hyperparameters) -> ConceptDelta``; `METHODS` names
the variants that `training/erase.py`, the ``d3pm-hub erase`` command and the benchmark run. Inference-time
erasure (`INFERENCE_METHODS`) changes no weights and lives in `InferenceTimeErasurePipeline` (the scripts write its
JSON erasure config); the concept-inversion attack that
measures robustness lives in :mod:`.attack`.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from ..deltas import ConceptDelta
from ..paths import DEFAULT_PIPELINE
from ..pipeline import D3PMPipeline
from .attack import AttackResult, attacked_parameters, concept_inversion_attack
from .closed_form import erase_closed_form
from .esd import erase_esd
from .inference import INFERENCE_METHODS, InferenceTimeErasurePipeline
from .interactions import train_pair_interactions
from .naive import erase_naive
from .on_policy import refine_singles
from .separable import erase_separable, erase_separable_jointly
from .sepme import decoupling_projector, erase_sepme

logger = logging.getLogger(__name__)

METHODS: dict[str, Callable[..., ConceptDelta]] = {
    "naive": erase_naive,
    "esd-x": partial(erase_esd, parameters="x"),
    "esd-u": partial(erase_esd, parameters="u"),
    "esd-full": partial(erase_esd, parameters="full"),
    "esd-x-kl": partial(erase_esd, parameters="x", loss="kl"),
    "esd-u-preserve": partial(erase_esd, parameters="u", preserve_weight=1.0),
    "closed-form": erase_closed_form,
    "sepme": erase_sepme,
    "separable": erase_separable,
}
# Methods that can train one delta per digit together, so that the deltas compose (``--jointly``).
JOINT_METHODS: dict[str, Callable[..., list[ConceptDelta]]] = {"separable": erase_separable_jointly}

__all__ = [
    "INFERENCE_METHODS",
    "JOINT_METHODS",
    "METHODS",
    "AttackResult",
    "InferenceTimeErasurePipeline",
    "add_erase_arguments",
    "attacked_parameters",
    "concept_inversion_attack",
    "decoupling_projector",
    "erase_closed_form",
    "erase_esd",
    "erase_naive",
    "erase_sepme",
    "erase_separable",
    "erase_separable_jointly",
    "refine_singles",
    "run_erase",
    "train_pair_interactions",
]


def parse_hyperparameters(assignments: list[str]) -> dict:
    """``["alpha=2", "parameters=x"]`` → ``{"alpha": 2, "parameters": "x"}`` (values read as JSON when they parse)."""
    values = {}
    for assignment in assignments:
        key, separator, text = assignment.partition("=")
        if not separator:
            raise ValueError(f"Hyper-parameters are KEY=VALUE, got {assignment!r}.")
        try:
            values[key.replace("-", "_")] = json.loads(text)
        except json.JSONDecodeError:
            values[key.replace("-", "_")] = text
    return values


def add_erase_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``training/erase.py`` and ``d3pm-hub erase``."""
    parser.add_argument("--method", required=True, choices=sorted([*METHODS, *INFERENCE_METHODS]))
    parser.add_argument("--digits", type=int, nargs="+", required=True, help="digits erased by one delta")
    parser.add_argument("--each", action="store_true", help="one delta per digit instead of one for all")
    parser.add_argument(
        "--jointly",
        action="store_true",
        help=f"one delta per digit, trained together so that they compose (methods: {', '.join(JOINT_METHODS)})",
    )
    parser.add_argument(
        "--pair-terms",
        metavar="FOLDER",
        help="fit pair interaction terms for FOLDER's jointly trained deltas digit-{d}.safetensors (--digits) and "
        "write the deltas with their terms to --output-dir; --set takes PairSettings fields (method: separable)",
    )
    parser.add_argument(
        "--refine",
        action="store_true",
        help="with --pair-terms: keep the pair terms FOLDER's deltas carry and add --set rounds=N on-policy rounds",
    )
    parser.add_argument(
        "--pairs",
        nargs="+",
        metavar="A+B",
        help="with --refine: only these pairs' terms (e.g. 0+7) run the --set rounds=N more rounds, with this run's "
        "null_alpha and refine_* settings",
    )
    parser.add_argument(
        "--complete",
        action="store_true",
        help="with --pair-terms: keep the pair terms that still apply and fit only the pairs without one",
    )
    parser.add_argument(
        "--single-rounds",
        metavar="FOLDER",
        help="run on-policy rounds on the null-label edits of FOLDER's jointly trained deltas digit-{d}.safetensors "
        "(--digits) and write them without pair terms to --output-dir (then refit those with --pair-terms "
        "--complete); --set takes SingleSettings fields (method: separable)",
    )
    parser.add_argument("--model", default=str(DEFAULT_PIPELINE), help="base pipeline folder or Hub repo id")
    parser.add_argument("--output-dir", default="outputs/deltas", help="writes {output_dir}/digit-{d}.safetensors")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="method hyper-parameters")
    parser.add_argument("--float32", action="store_true", help="store increments in float32 (default float16)")


def model_name(model: str) -> str:
    """How a delta names its base: a Hub id as given, a local folder relative to the working directory when it
    lies inside it (no absolute paths of this machine in files meant for sharing), else the folder's name."""
    path = Path(model)
    if not path.is_dir():
        return model
    resolved = path.resolve()
    return str(resolved.relative_to(Path.cwd())) if resolved.is_relative_to(Path.cwd()) else resolved.name


def run_erase(args: argparse.Namespace) -> list[Path]:
    """Load the base pipeline, erase, and save the delta(s); returns the files written (main process only)."""
    from accelerate import PartialState

    pipeline = D3PMPipeline.from_pretrained(args.model)
    pipeline.to(PartialState().device)
    hyperparameters = parse_hyperparameters(args.set)
    base_model = model_name(args.model)
    if args.jointly and args.method not in JOINT_METHODS:
        raise ValueError(f"--jointly needs a method in {sorted(JOINT_METHODS)}, got {args.method!r}.")
    if (args.refine or args.complete) and not args.pair_terms:
        raise ValueError("--refine and --complete work on existing pair terms: name their folder with --pair-terms.")
    if args.pairs and not args.refine:
        raise ValueError("--pairs chooses the pair terms that --refine adds rounds to: pass --refine too.")
    folder = args.pair_terms or args.single_rounds
    if folder and args.method not in JOINT_METHODS:
        raise ValueError(
            f"--pair-terms and --single-rounds need a method in {sorted(JOINT_METHODS)}, got {args.method!r}."
        )
    if args.pair_terms and args.single_rounds:
        raise ValueError("Run --single-rounds first, then --pair-terms --complete on its output.")
    groups = [[digit] for digit in args.digits] if args.each else [args.digits]
    if folder:
        singles = [ConceptDelta.load(Path(folder) / f"digit-{digit}.safetensors") for digit in args.digits]
        if args.single_rounds:
            erasures, kl = refine_singles(pipeline, singles, **hyperparameters)
        else:
            options = dict(refine=args.refine, complete=args.complete, pairs=args.pairs)
            erasures, kl = train_pair_interactions(pipeline, singles, **options, **hyperparameters)
        logger.info("Held-out KL of each null label to its target, [before, after]: %s", kl)
    elif args.method in INFERENCE_METHODS:
        settings = {"negative_scale": INFERENCE_METHODS[args.method]} | hyperparameters
        erasures = [InferenceTimeErasurePipeline.wrap(pipeline, digits, **settings) for digits in groups]
    elif args.jointly:
        erasures = JOINT_METHODS[args.method](pipeline, args.digits, base_model=base_model, **hyperparameters)
    else:
        method = METHODS[args.method]
        erasures = [method(pipeline, digits, base_model=base_model, **hyperparameters) for digits in groups]
    written = []
    for erasure in erasures if PartialState().is_main_process else []:
        name = "digit-" + "-".join(map(str, erasure.concepts))
        if isinstance(erasure, InferenceTimeErasurePipeline):  # no weights change: an erasure config
            written.append(erasure.save_erasure(Path(args.output_dir) / f"{name}.json", base_model))
        else:
            dtype = torch.float32 if args.float32 else torch.float16
            written.append(erasure.save(Path(args.output_dir) / f"{name}.safetensors", dtype=dtype))
            logger.info("Wrote %s (%d values, %s)", written[-1], erasure.num_parameters(), erasure.metrics)
    return written
