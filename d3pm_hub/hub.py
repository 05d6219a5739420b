"""The Hugging Face Hub side of d3pm-hub: resolve, push and pull pipelines and concept deltas; export LoRA adapters.

Layout on the Hub — one model repo holds a base pipeline and the erasures made for it::

    org/d3pm-mnist
    ├── README.md                          base card (model-index eval results, rendered by d3pm_hub.cards)
    ├── model_index.json
    ├── unet/config.json, unet/diffusion_pytorch_model.safetensors
    ├── scheduler/scheduler_config.json
    ├── eval.json, training.json           the measurements the card was rendered from
    └── deltas/{method}/digit-{d}.safetensors (+ digit-{d}.md, the delta's card)

Deltas live beside their base rather than in repos of their own: a user who finds the base finds every erasure made
for it, one revision pins both, and the base card links them. A delta may still be pushed to any other repo
(`push_delta` takes the base repo separately). Either way, pushing a delta writes into its metadata the repo
(``base_model``) and the commit (``base_revision``) of the base it was made for; the binding check itself is the
``base_model_hash`` of the weights, which `load_delta` compares with a given pipeline.

Only safetensors, json and markdown travel in either direction: `push_pipeline` and `push_deltas` upload nothing
else, `resolve_folder` downloads nothing else (and skips ``deltas/``), and `load_delta` refuses any other file
before a byte is downloaded. With ``HF_HUB_OFFLINE=1`` only the huggingface_hub cache is consulted and a missing
file fails at once with a `FileNotFoundError` that says so.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
from huggingface_hub.utils import filter_repo_objects
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

if TYPE_CHECKING:
    from .deltas import ConceptDelta

# `deltas` is imported inside the functions that need it: it imports the pipeline, which imports this module.

logger = logging.getLogger(__name__)

SAFE_PATTERNS = ("*.json", "*.safetensors", "*.md")
PIPELINE_UPLOAD_PATTERNS = ("*.safetensors", "*.json")
DELTAS_FOLDER = "deltas"
DELTA_SUFFIX = ".safetensors"
CARD_SUFFIX = ".md"
LORA_WEIGHTS_NAME = "adapter_model.safetensors"
LORA_CONFIG_NAME = "adapter_config.json"
LORA_PREFIX = "base_model.model."


def _offline_error(what: str, error: Exception) -> FileNotFoundError:
    """The error for a file that is neither local nor in the cache while the Hub cannot be reached."""
    return FileNotFoundError(
        f"{what} is not a local path and is not in the Hugging Face cache, and the Hub cannot be reached "
        f"(HF_HUB_OFFLINE=1 or no network). Download it once online, or pass a local path. ({error})"
    )


def resolve_folder(path_or_repo_id: str | Path, revision: str | None = None) -> Path:
    """A local folder as is, or a Hub repo id downloaded (safetensors/json/md only, not ``deltas/``) into the cache.

    With ``HF_HUB_OFFLINE=1`` only the cache is consulted, and a missing repo fails at once.
    """
    local = Path(path_or_repo_id).expanduser()
    if local.is_dir():
        return local
    if local.exists() or str(path_or_repo_id).count("/") > 1:
        raise FileNotFoundError(f"{path_or_repo_id!s} is neither a folder nor a Hub repo id ('org/name').")
    try:
        folder = snapshot_download(
            str(path_or_repo_id),
            revision=revision,
            allow_patterns=list(SAFE_PATTERNS),
            ignore_patterns=[f"{DELTAS_FOLDER}/*"],
        )
    except LocalEntryNotFoundError as error:
        raise _offline_error(str(path_or_repo_id), error) from error
    return Path(folder)


def push_pipeline(
    pipeline_or_folder,
    repo_id: str,
    *,
    commit_message: str | None = None,
    revision: str | None = None,
    private: bool | None = None,
    token: str | None = None,
) -> str:
    """Upload a pipeline (a `D3PMPipeline` or a folder written by ``save_pretrained``) to a Hub model repo.

    Creates the repo if needed and commits ``model_index.json``, ``unet/``, ``scheduler/`` and any other ``*.json``
    (e.g. ``eval.json``) — safetensors and json only (a pipeline object is saved with safetensors first) — plus the
    ``README.md`` card: rendered for ``repo_id`` when the folder holds an ``eval.json``, else the folder's own.

    Returns: the id (sha) of the commit.
    """
    from .cards import CARD_NAME, EVAL_NAME, base_card

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        if isinstance(pipeline_or_folder, (str, Path)):
            folder = Path(pipeline_or_folder)
        else:
            folder = Path(scratch)
            pipeline_or_folder.save_pretrained(folder, safe_serialization=True)
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(f"{folder} has no model_index.json: it is not a saved pipeline.")
        files = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
        ignore = [f"{DELTAS_FOLDER}/*"]
        selected = filter_repo_objects(files, allow_patterns=list(PIPELINE_UPLOAD_PATTERNS), ignore_patterns=ignore)
        operations = [CommitOperationAdd(name, folder / name) for name in selected]
        if (folder / EVAL_NAME).is_file():
            operations.append(CommitOperationAdd(CARD_NAME, str(base_card(folder, repo_id=repo_id)).encode()))
        elif (folder / CARD_NAME).is_file():
            operations.append(CommitOperationAdd(CARD_NAME, folder / CARD_NAME))
        commit = api.create_commit(
            repo_id, operations, commit_message=commit_message or "Upload D3PM pipeline", revision=revision
        )
    logger.info("Pushed the pipeline to %s: commit %s", repo_id, commit.oid)
    return commit.oid


def delta_path_in_repo(delta: ConceptDelta) -> str:
    """``deltas/{method}/digit-{d}.safetensors`` (digits joined by ``-`` for a multi-concept delta)."""
    digits = "-".join(str(concept) for concept in delta.concepts)
    return f"{DELTAS_FOLDER}/{delta.method}/digit-{digits}{DELTA_SUFFIX}"


def delta_paths_in_repo(paths: list[str | Path]) -> dict[str, str | Path]:
    """Path in the repo (`delta_path_in_repo`) → local file; refuses two files that would land on one path."""
    from .deltas import ConceptDelta

    placed: dict[str, str | Path] = {}
    for path in paths:
        path_in_repo = delta_path_in_repo(ConceptDelta.load(path))
        if path_in_repo in placed:
            raise ValueError(
                f"{placed[path_in_repo]} and {path} would both be pushed to {path_in_repo} (same method and "
                "digits): push one of them, or pass {path in repo: file} to place them yourself."
            )
        placed[path_in_repo] = path
    return placed


def push_deltas(
    deltas: dict[str, str | Path] | list[str | Path],
    repo_id: str,
    *,
    base_repo_id: str | None = None,
    base_revision: str | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    private: bool | None = None,
    token: str | None = None,
) -> str:
    """Upload delta files, each with its rendered card, to a Hub repo in one commit.

    Each file is validated (`ConceptDelta.load`) and checked against the base pipeline at that revision (pulled
    into the cache: its weights must hash to the delta's ``base_model_hash``), then uploaded with ``base_model``
    set to the base repo and ``base_revision`` to its commit, and a card rendered from that metadata beside it.

    Args:
        deltas: path in repo → local file, or local files (placed at `delta_path_in_repo`).
        repo_id: the repo to push to (created if needed).
        base_repo_id: the repo of the base pipeline (default ``repo_id``: deltas beside their base).
        base_revision: the base's commit (default: the current head of ``base_repo_id``).
        commit_message, revision, private, token: as in `HfApi.create_commit` / `HfApi.create_repo`.

    Returns: the id (sha) of the commit.
    """
    from .cards import delta_card
    from .deltas import ConceptDelta
    from .pipeline import D3PMPipeline

    if not isinstance(deltas, dict):
        deltas = delta_paths_in_repo(deltas)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    base_repo_id = base_repo_id or repo_id
    base_revision = base_revision or api.repo_info(base_repo_id).sha
    base = D3PMPipeline.from_pretrained(base_repo_id, revision=base_revision)
    operations = []
    with tempfile.TemporaryDirectory() as scratch:
        for index, (path_in_repo, local_path) in enumerate(sorted(deltas.items())):
            if not path_in_repo.endswith(DELTA_SUFFIX):
                raise ValueError(f"A delta goes to a {DELTA_SUFFIX} path in the repo, got {path_in_repo!r}.")
            delta = ConceptDelta.load(local_path)
            check_base(delta, base)
            delta.metadata.update(base_model=base_repo_id, base_revision=base_revision)
            stored = delta.save(Path(scratch) / f"{index}{DELTA_SUFFIX}", dtype=_stored_dtype(local_path))
            card = delta_card(delta, path_in_repo=path_in_repo, repo_id=repo_id)
            operations += [
                CommitOperationAdd(path_in_repo, stored),
                CommitOperationAdd(path_in_repo.removesuffix(DELTA_SUFFIX) + CARD_SUFFIX, str(card).encode()),
            ]
        commit = api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or f"Upload {len(deltas)} concept delta(s) for {base_repo_id}",
            revision=revision,
        )
    logger.info("Pushed %d delta(s) to %s: commit %s", len(deltas), repo_id, commit.oid)
    return commit.oid


def push_delta(delta_path: str | Path, repo_id: str, path_in_repo: str | None = None, **kwargs) -> str:
    """Upload one delta file (and its card); ``path_in_repo`` defaults to `delta_path_in_repo`.

    Keyword arguments go to `push_deltas`. Returns: the id (sha) of the commit.
    """
    return push_deltas({path_in_repo: delta_path} if path_in_repo else [delta_path], repo_id, **kwargs)


def _stored_dtype(path: str | Path) -> torch.dtype:
    """The dtype a safetensors file stores its (first) tensor in, so a rewrite keeps it."""
    with safe_open(str(path), framework="pt") as file:
        return file.get_tensor(next(iter(file.keys()))).dtype


def load_delta(
    path_or_repo_id: str | Path,
    filename: str | None = None,
    revision: str | None = None,
    pipeline=None,
    token: str | None = None,
) -> ConceptDelta:
    """A delta from a local file, or from a Hub repo (downloaded with huggingface_hub into its cache).

    Args:
        path_or_repo_id: a local ``.safetensors`` delta file, a local folder, or a repo id ``org/name``.
        filename: the file in the folder or repo (e.g. ``deltas/closed-form/digit-9.safetensors``); only
            ``.safetensors`` files are accepted, checked before anything is downloaded.
        revision: a branch, tag or commit of the repo.
        pipeline: if given, the delta must have been made for this pipeline's UNet (same ``base_model_hash``).
        token: a Hub token for private repos.

    Raises:
        ValueError: not a ``.safetensors`` file, an invalid delta, or a delta made for another base model.
        FileNotFoundError: not found locally, and not in the cache while offline (``HF_HUB_OFFLINE=1``).
    """
    from .deltas import ConceptDelta

    local = Path(path_or_repo_id).expanduser()
    target = filename if filename is not None else str(path_or_repo_id)
    if not target.endswith(DELTA_SUFFIX):
        raise ValueError(f"Refusing {target!r}: deltas are loaded from {DELTA_SUFFIX} files only.")
    if filename is None or local.is_dir():
        path = local if filename is None else local / filename
        if not path.is_file():
            raise FileNotFoundError(f"No delta file at {path} (for a Hub repo, pass the filename in the repo).")
    else:
        try:
            path = Path(hf_hub_download(str(path_or_repo_id), filename, revision=revision, token=token))
        except LocalEntryNotFoundError as error:
            raise _offline_error(f"{path_or_repo_id}/{filename}", error) from error
    delta = ConceptDelta.load(path)
    if pipeline is not None:
        check_base(delta, pipeline)
    return delta


def check_base(delta: ConceptDelta, pipeline) -> None:
    """Raise a `ValueError` unless ``delta`` was made for ``pipeline``'s UNet (same weights hash)."""
    from .deltas import base_hash_of

    expected = base_hash_of(pipeline)
    if delta.metadata["base_model_hash"] != expected:
        made_for = delta.metadata.get("base_model") or "an unknown model"
        if delta.metadata.get("base_revision"):
            made_for += f"@{delta.metadata['base_revision']}"
        raise ValueError(
            f"Refusing the {delta.method} delta for digits {delta.concepts}: it was made for another base model "
            f"({made_for}, weights hash {delta.metadata['base_model_hash'][:12]}…), not this pipeline "
            f"(hash {expected[:12]}…). Load the base it names."
        )


@dataclass
class LoraFactor:
    """How one parameter increment Δ maps to a LoRA pair (or why it does not).

    Attributes:
        name: the parameter, e.g. ``unet.….attn2.to_k.weight``.
        shape: Δ's shape.
        layer: ``"linear"``, ``"conv"`` or ``"embedding"`` when a LoRA pair can express it, else None.
        rank: the smallest rank r whose truncated SVD reconstructs Δ to the tolerance (None if no layer).
        full_rank: min of Δ's two (flattened) dimensions: the rank of a dense increment.
        relative_error: ‖Δ − B A‖_F / ‖Δ‖_F at that rank.
        reason: why it cannot be exported (None when it can).
    """

    name: str
    shape: tuple[int, ...]
    layer: str | None
    rank: int | None
    full_rank: int
    relative_error: float | None
    reason: str | None

    @property
    def exportable(self) -> bool:
        return self.reason is None


LORA_LAYERS = {nn.Linear: "linear", nn.Conv2d: "conv", nn.Embedding: "embedding"}


def _layer_kind(unet: nn.Module, name: str) -> str | None:
    """ "linear", "conv" or "embedding" when ``name`` is the weight of such a module of ``unet``, else None."""
    module_name, _, attribute = name.rpartition(".")
    if attribute != "weight":
        return None
    try:
        module = unet.get_submodule(module_name)
    except AttributeError:
        return None
    return next((kind for cls, kind in LORA_LAYERS.items() if type(module) is cls), None)


def _as_matrix(increment: torch.Tensor, layer: str) -> torch.Tensor:
    """Δ as the matrix LoRA factorises as B @ A: (out, in·kh·kw) for convs, (dim, num) for embeddings."""
    if layer == "conv":
        return increment.flatten(1)
    return increment.T if layer == "embedding" else increment


def _truncated_svd(matrix: torch.Tensor, tolerance: float) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """B (m, r), A (r, n) with ‖M − B A‖_F ≤ tolerance · ‖M‖_F at the smallest such r (split √σ to each side)."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    total = s.square().sum()
    # tail[r] = Σ_{i ≥ r} σ_i² = ‖M − M_r‖_F², the error of keeping the first r singular values.
    tail = torch.cat([s.square().flip(0).cumsum(0).flip(0), s.new_zeros(1)])
    rank = int(torch.nonzero(tail <= tolerance**2 * total)[0]) if total > 0 else 0
    rank = max(rank, 1)
    error = float((tail[rank] / total).sqrt()) if total > 0 else 0.0
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float(), rank, error


def lora_factors(
    delta: ConceptDelta, unet: nn.Module, tolerance: float = 1e-3
) -> tuple[list[LoraFactor], dict[str, torch.Tensor]]:
    """Factorise every increment of a delta as LoRA ``B @ A`` by truncated SVD, where that is possible.

    Linear weights Δ (out, in) give ``lora_A`` (r, in) and ``lora_B`` (out, r); conv weights (out, in, kh, kw)
    give a k×k ``lora_A`` (r, in, kh, kw) and a 1×1 ``lora_B`` (out, r, 1, 1); embeddings (num, dim) give PEFT's
    ``lora_embedding_A`` (r, num) and ``lora_embedding_B`` (dim, r), Δ = (B A)ᵀ. r is the smallest rank with
    relative Frobenius error ≤ ``tolerance``. Not possible: increments of biases, norms and free parameters
    (e.g. context tokens), and increments that are not low-rank (r·(m + n) ≥ m·n: the factors would be larger
    than Δ itself — typical of ESD-u, whose gradient steps fill the whole matrix).

    Returns: one `LoraFactor` per increment (sorted by name), and the PEFT-named tensors of the exportable ones
    (``base_model.model.{module}.lora_A.weight`` …).
    """
    factors, tensors = [], {}
    for name, increment in sorted(delta.tensors.items()):
        layer, shape = _layer_kind(unet, name), tuple(increment.shape)
        full_rank = min(shape[0], int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 1
        if layer is None:
            reason = "not the weight of a Linear, Conv2d or Embedding layer (LoRA adapts only those)"
            factors.append(LoraFactor(name, shape, None, None, full_rank, None, reason))
            continue
        matrix = _as_matrix(increment, layer)
        lora_b, lora_a, rank, error = _truncated_svd(matrix, tolerance)
        reason = None
        if rank * sum(matrix.shape) >= matrix.numel():
            reason = f"not low-rank: needs rank {rank} of {full_rank} for tolerance {tolerance:g}"
        factors.append(LoraFactor(name, shape, layer, rank, full_rank, error, reason))
        if reason is not None:
            continue
        module = LORA_PREFIX + name.removesuffix(".weight")
        if layer == "embedding":
            tensors[f"{module}.lora_embedding_A"], tensors[f"{module}.lora_embedding_B"] = lora_a, lora_b
        else:
            if layer == "conv":
                lora_a, lora_b = lora_a.reshape(rank, *shape[1:]), lora_b[:, :, None, None]
            tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"] = lora_a, lora_b
    return factors, tensors


class NotLowRankError(ValueError):
    """A delta that cannot be exported as a LoRA adapter; ``factors`` says which increments and why."""

    def __init__(self, factors: list[LoraFactor]):
        self.factors = factors
        lines = [f"  {f.name} {f.shape}: {f.reason}" for f in factors if not f.exportable]
        super().__init__("This delta cannot be exported as a LoRA adapter:\n" + "\n".join(lines))


def export_lora(delta: ConceptDelta, unet: nn.Module, folder: str | Path, tolerance: float = 1e-3) -> list[LoraFactor]:
    """Write a delta as a PEFT LoRA adapter: ``adapter_model.safetensors`` + ``adapter_config.json``.

    Each module gets its own rank (``rank_pattern``) and ``lora_alpha`` = rank (``alpha_pattern``), so PEFT's
    scaling α/r is 1 and the adapter adds exactly B A ≈ Δ: ``PeftModel.from_pretrained(unet, folder)`` (or
    ``peft.inject_adapter_in_model`` + ``set_peft_model_state_dict``) reproduces the erased model. A delta's pair
    terms (`ConceptDelta.interactions`) act only when it is composed with a partner, so the adapter leaves them out.

    Raises:
        NotLowRankError: if any increment cannot be expressed (see `lora_factors`); nothing is written then.

    Returns: the `LoraFactor` of every increment (the ranks chosen).
    """
    factors, tensors = lora_factors(delta, unet, tolerance)
    if not all(factor.exportable for factor in factors):
        raise NotLowRankError(factors)
    modules = {factor.name.removesuffix(".weight"): factor.rank for factor in factors}
    default_rank = max(modules.values())
    config = {
        "peft_type": "LORA",
        "r": default_rank,
        "lora_alpha": default_rank,
        "rank_pattern": {module: rank for module, rank in modules.items() if rank != default_rank},
        "alpha_pattern": {module: rank for module, rank in modules.items() if rank != default_rank},
        "target_modules": sorted(modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "init_lora_weights": True,
        "base_model_name_or_path": delta.metadata.get("base_model") or None,
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "d3pm_hub_delta": json.dumps(delta.metadata, sort_keys=True)}
    save_file({name: value.contiguous() for name, value in tensors.items()}, folder / LORA_WEIGHTS_NAME, metadata)
    (folder / LORA_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return factors
