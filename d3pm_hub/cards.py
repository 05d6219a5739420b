"""Model cards rendered from measured results: one for the base pipeline, one per concept delta.

Cards are huggingface_hub `ModelCard`s: a YAML front matter (`ModelCardData`, with the measured numbers as
``model-index`` `EvalResult`s) and a markdown body, both rendered by jinja from the templates in ``model_cards/``.
Every number comes from a file written by a measuring script — ``eval.json`` (``d3pm-hub eval``), ``training.json``
and the configs beside the base weights; the ``metrics`` metadata inside each delta file — never from this code.
Rendering is deterministic (no clock, sorted inputs), so `check_cards_up_to_date` can compare the committed cards
with a fresh render and fail CI when a measurement changed but its card was not regenerated (``d3pm-hub cards``).

Where the cards sit: ``pretrained/d3pm-mnist/README.md`` and ``pretrained/deltas/{method}/digit-{d}.md`` beside
``digit-{d}.safetensors``; on the Hub, the repo's ``README.md`` and ``deltas/{method}/digit-{d}.md``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from safetensors import safe_open

from .deltas import ConceptDelta
from .hub import CARD_SUFFIX, DELTAS_FOLDER
from .paths import DEFAULT_PIPELINE, PRETRAINED, REPO_ROOT, atomic_write_text

TEMPLATES = REPO_ROOT / "model_cards"
BASE_TEMPLATE = TEMPLATES / "base_model.md.j2"
DELTA_TEMPLATE = TEMPLATES / "delta.md.j2"
EVAL_NAME, TRAINING_NAME, CARD_NAME = "eval.json", "training.json", "README.md"

TASK = {"task_type": "unconditional-image-generation", "task_name": "Class-conditional digit generation"}
DATASET = {"dataset_type": "ylecun/mnist", "dataset_name": "MNIST"}
TAGS = ["d3pm", "discrete-diffusion", "mnist", "concept-erasure", "d3pm-hub"]
BASE_METRICS = (
    # (key in eval.json, metric type, metric name)
    ("mean_accuracy", "accuracy", "Mean per-class accuracy (digit classifier)"),
    ("min_class_accuracy", "accuracy", "Lowest per-class accuracy"),
    ("mean_confidence", "confidence", "Mean classifier confidence"),
    ("fd_overall", "frechet_distance", "Classifier-feature Fréchet distance to real digits"),
    ("fd_floor_overall", "frechet_distance", "Real-vs-real Fréchet distance floor"),
)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _num_parameters(folder: Path) -> int:
    """Values stored in the safetensors files under ``folder`` (read from their headers)."""
    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as file:
            total += sum(math.prod(file.get_slice(name).get_shape()) for name in file.keys())  # noqa: SIM118
    return total


def base_eval_results(evaluation: dict) -> list[EvalResult]:
    """``model-index`` entries of an evaluation result dict (``d3pm-hub eval``): summary and per-digit accuracy."""
    source = {**TASK, **DATASET}
    results = [
        EvalResult(metric_type=metric_type, metric_name=name, metric_value=evaluation[key], **source)
        for key, metric_type, name in BASE_METRICS
        if _is_number(evaluation.get(key))
    ]
    for digit, accuracy in enumerate(evaluation.get("per_class_accuracy") or []):
        if _is_number(accuracy):
            name = f"Accuracy of samples of digit {digit}"
            results.append(EvalResult(metric_type="accuracy", metric_name=name, metric_value=accuracy, **source))
    return results


def base_card(folder: str | Path = DEFAULT_PIPELINE, repo_id: str | None = None) -> ModelCard:
    """The card of a saved pipeline, from its ``eval.json``, ``training.json`` and configs.

    Args:
        folder: the pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``, ``eval.json``).
        repo_id: the Hub id shown in the card's code (default: a ``<user>/{name}`` placeholder; `push_pipeline`
            renders the card again with the id it pushes to).

    Raises:
        FileNotFoundError: the folder has no ``eval.json`` (a card without measurements is not rendered).
    """
    folder = Path(folder)
    if not (folder / EVAL_NAME).is_file():
        raise FileNotFoundError(f"{folder} has no {EVAL_NAME}: run `d3pm-hub eval` first; cards hold measured numbers.")
    evaluation = _read_json(folder / EVAL_NAME)
    model_name = folder.resolve().name
    card_data = ModelCardData(
        model_name=model_name,
        license="apache-2.0",
        tags=TAGS,
        datasets=[DATASET["dataset_type"]],
        pipeline_tag=TASK["task_type"],
        eval_results=base_eval_results(evaluation),
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(BASE_TEMPLATE),
        model_name=model_name,
        repo_id=repo_id,
        eval=evaluation,
        training=_read_json(folder / TRAINING_NAME),
        unet=_read_json(folder / "unet" / "config.json"),
        scheduler=_read_json(folder / "scheduler" / "scheduler_config.json"),
        num_parameters=_num_parameters(folder / "unet"),
    )


def _flatten(metrics: dict, prefix: str = "") -> dict:
    """Nested dicts → ``{"a.b": value}``, keeping the writer's order."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def delta_card(delta: ConceptDelta, path_in_repo: str = "", repo_id: str | None = None) -> ModelCard:
    """The card of a concept delta, from the metadata stored in its safetensors file.

    Every finite scalar in the ``metrics`` JSON becomes a ``model-index`` result (nested keys joined by ``.``);
    lists are shown in the body only. The front matter names ``base_model`` only once the delta has been
    pushed (``base_revision`` set): before that, ``base_model`` may be a local path rather than a Hub id.

    Args:
        delta: the delta (its string metadata, and the tensors' count and size).
        path_in_repo: where the delta file lives (shown in the card's code).
        repo_id: the repo holding the delta (default: its base repo, once pushed).
    """
    metadata = delta.metadata
    concepts = json.loads(metadata.get("concepts", "[]"))
    metrics = _flatten(json.loads(metadata.get("metrics") or "{}"))
    method = metadata.get("method", "")
    base_revision = metadata.get("base_revision")
    erasure_task = {"task_type": TASK["task_type"], "task_name": f"Erasure of digit(s) {concepts} ({method})"}
    eval_results = [
        EvalResult(metric_type=key, metric_name=key.replace("_", " "), metric_value=value, **erasure_task, **DATASET)
        for key, value in metrics.items()
        if _is_number(value)
    ]
    name = f"{method}-digit-{'-'.join(map(str, concepts))}"
    card_data = ModelCardData(
        model_name=name,
        license="apache-2.0",
        tags=[*TAGS, "d3pm-hub-delta", method],
        base_model=metadata.get("base_model") if base_revision else None,
        eval_results=eval_results or None,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(DELTA_TEMPLATE),
        concepts=concepts,
        method=method,
        hyperparameters=json.loads(metadata.get("hyperparameters") or "{}"),
        metrics=metrics,
        base_model=metadata.get("base_model", ""),
        base_revision=base_revision,
        base_model_hash=metadata.get("base_model_hash", ""),
        format_version=metadata.get("format_version", ""),
        created=metadata.get("created"),
        repo_id=repo_id or (metadata.get("base_model") if base_revision else None),
        path_in_repo=path_in_repo,
        num_parameters=delta.num_parameters(),
        num_tensors=len(delta.tensors),
        partners=sorted(delta.interactions),
        own_targeted_rounds=own_targeted_rounds(delta),
        num_pair_values=sum(value.numel() for value in delta.interaction_tensors().values()),
    )


def own_targeted_rounds(delta: ConceptDelta) -> list[dict]:
    """The targeted pair rounds of the delta's record (`~d3pm_hub.erasure.interactions.targeted_rounds`) that
    fitted its own terms, each listing only its own pairs."""
    own = "-".join(map(str, delta.concepts))
    return [
        entry | {"pairs": mine}
        for entry in delta.hyperparameters.get("pair_terms", {}).get("targeted", [])
        if (mine := [pair for pair in entry["pairs"] if own in pair.split("+")])
    ]


def _display_path(path: Path) -> str:
    """``path`` relative to the repository root when inside it (so rendered cards do not depend on the checkout)."""
    resolved = path.resolve()
    return str(resolved.relative_to(REPO_ROOT)) if resolved.is_relative_to(REPO_ROOT) else str(path)


def expected_cards(pretrained: str | Path = PRETRAINED) -> dict[Path, str]:
    """Every card that belongs beside the shipped weights → its rendered text.

    The base card of each pipeline folder with an ``eval.json`` (``{folder}/README.md``), and the card of each
    delta file under ``deltas/`` (``digit-{d}.safetensors`` → ``digit-{d}.md``).
    """
    pretrained = Path(pretrained)
    cards = {
        folder.parent / CARD_NAME: str(base_card(folder.parent))
        for folder in sorted(pretrained.glob(f"*/{EVAL_NAME}"))
        if (folder.parent / "model_index.json").is_file()
    }
    deltas_folder = pretrained / DELTAS_FOLDER
    for path in sorted(deltas_folder.glob("**/*.safetensors")):
        path_in_repo = f"{DELTAS_FOLDER}/{path.relative_to(deltas_folder).as_posix()}"
        cards[path.with_suffix(CARD_SUFFIX)] = str(delta_card(ConceptDelta.load(path), path_in_repo=path_in_repo))
    return cards


def write_cards(pretrained: str | Path = PRETRAINED) -> list[Path]:
    """Render every card (`expected_cards`) and write those whose text changed; returns the paths written."""
    written = []
    for path, text in expected_cards(pretrained).items():
        if not path.is_file() or path.read_text() != text:
            written.append(atomic_write_text(path, text))
    return written


def stale_cards(pretrained: str | Path = PRETRAINED) -> list[Path]:
    """Cards that are missing or differ from a fresh render."""
    return [path for path, text in expected_cards(pretrained).items() if not path.is_file() or path.read_text() != text]


def check_cards_up_to_date(pretrained: str | Path = PRETRAINED) -> None:
    """Raise `AssertionError` naming every stale or missing card (CI runs this through the tests)."""
    stale = stale_cards(pretrained)
    if stale:
        listing = "\n".join(f"  {_display_path(path)}" for path in stale)
        raise AssertionError(f"Model cards out of date with their measurements:\n{listing}\nRun `d3pm-hub cards`.")
