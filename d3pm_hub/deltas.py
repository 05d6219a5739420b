"""Concept deltas: one safetensors file per erasure, composed onto a pipeline as θ = θ₀ + Σᵢ sᵢ Δᵢ.

A `ConceptDelta` holds the increments Δ of the parameters an erasure edited (names as in
``unet.named_parameters()``) and string metadata: format version, the erased concept(s), the method and its
hyper-parameters, the identity of the base model (`base_model_hash`: sha256 of its weights), measured metrics
and the creation time.

There is one composition path, `compose_parameters`: it checks every delta against the base model and returns
the touched parameters θ₀ + Σ sᵢ Δᵢ. `fuse` bakes them into a private copy of the pipeline (a few
milliseconds): the thread-safe way to serve concurrent requests with different deltas, since the copies share
nothing. `apply_deltas` / `remove_deltas` write the same values into the UNet in place (keeping the base
tensors, so removal restores them bit for bit) and `deltas_applied` does that for one block under a
per-pipeline lock. ``pipeline(..., unet_parameters=compose_parameters(...))`` loads the composed weights into a
private copy of the UNet for that call, so concurrent callers with different deltas never share weights.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import threading
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .paths import atomic_write
from .pipeline import D3PMPipeline

FORMAT_VERSION = 3  # 2: pair interaction terms (``interaction/…`` tensors); 3: image-path pair terms (``…:up``)
REQUIRED_METADATA = ("format_version", "concepts", "method", "base_model_hash")
INTERACTION_PREFIX = "interaction/"


@dataclass
class ConceptDelta:
    """Increments of the edited parameters only, plus string metadata.

    Attributes:
        tensors: parameter name → increment Δ (same shape as the parameter).
        metadata: ``format_version``, ``concepts`` (JSON list of ints), ``method``, ``hyperparameters`` (JSON),
            ``base_model_hash``, ``base_model`` (repo/revision or path), ``metrics`` (JSON), ``created`` (ISO time),
            and with pair terms ``interactions`` (JSON: partner → content hash of the partner delta).
        interactions: partner (its digits, ``"2"``) → parameter name → the change ``(out, n)`` of the null label's
            n tokens' keys/values applied when this delta is composed with that partner, or ``{name}:up`` and
            ``{name}:down`` → the low-rank factors of an image-path term (`~d3pm_hub.erasure.interactions`); stored
            as ``interaction/{partner}/{key}`` tensors.
    """

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    interactions: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def create(
        cls,
        unet: torch.nn.Module,
        increments: dict[str, torch.Tensor],
        concepts: list[int],
        method: str,
        hyperparameters: dict | None = None,
        base_model: str = "",
        metrics: dict | None = None,
    ) -> ConceptDelta:
        """A delta for ``unet`` (its weights are hashed as the base identity) with full metadata."""
        metadata = {
            "format_version": str(FORMAT_VERSION),
            "concepts": json.dumps([int(c) for c in concepts]),
            "method": method,
            "hyperparameters": json.dumps(hyperparameters or {}, sort_keys=True, default=str),
            "base_model_hash": base_model_hash(unet),
            "base_model": base_model,
            "metrics": json.dumps(metrics or {}, sort_keys=True),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        tensors = {name: value.detach().float().cpu().contiguous() for name, value in increments.items()}
        return cls(tensors=tensors, metadata=metadata)

    @property
    def concepts(self) -> list[int]:
        """The erased digits."""
        return json.loads(self.metadata.get("concepts", "[]"))

    @property
    def method(self) -> str:
        return self.metadata.get("method", "")

    @property
    def hyperparameters(self) -> dict:
        return json.loads(self.metadata.get("hyperparameters", "{}"))

    @property
    def metrics(self) -> dict:
        return json.loads(self.metadata.get("metrics", "{}"))

    def num_parameters(self) -> int:
        """Number of stored increment values."""
        return sum(t.numel() for t in self.tensors.values())

    def interaction_tensors(self) -> dict[str, torch.Tensor]:
        """The pair terms as stored: ``interaction/{partner}/{key}`` → change ``(out, n)`` or factor."""
        return {
            f"{INTERACTION_PREFIX}{partner}/{name}": value
            for partner, changes in self.interactions.items()
            for name, value in changes.items()
        }

    def save(self, path: str | Path, dtype: torch.dtype = torch.float16) -> Path:
        """Write a safetensors file atomically (a temp file in the same folder, then ``os.replace``).

        Increments are stored in ``dtype`` (float16 by default: half the size; the rounding is ≤ 2⁻¹¹ relative).
        Rounding also moves a decoupled increment slightly off the null space it was projected onto: with the
        shipped float16 deltas of 9 other labels' keys/values move by at most 1.2e-4 (``closed-form``) and 3.8e-4
        (``separable``) of their norm. Save in float32 where they must stay exact.
        """
        self.validate()
        tensors = {name: value.to(dtype).contiguous() for name, value in self.tensors.items()}
        tensors |= {key: value.to(dtype).contiguous() for key, value in self.interaction_tensors().items()}
        if not all(torch.isfinite(value).all() for value in tensors.values()):
            raise ValueError(f"Increments overflow {dtype}; save in float32.")
        return atomic_write(path, lambda temporary: save_file(tensors, temporary, metadata=self.metadata))

    @classmethod
    def load(cls, path: str | Path) -> ConceptDelta:
        """Read and validate a delta file; increments come back as float32.

        Raises:
            ValueError: not a (complete) safetensors file, missing metadata, a newer format version, or
                non-finite values.
        """
        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as file:
                metadata = dict(file.metadata() or {})
                stored = {name: file.get_tensor(name).float() for name in file.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, RuntimeError) as error:
            if isinstance(error, FileNotFoundError):
                raise
            raise ValueError(
                f"{path} is not a valid safetensors delta file (truncated or corrupt?): {error}"
            ) from error
        tensors = {name: value for name, value in stored.items() if not name.startswith(INTERACTION_PREFIX)}
        interactions: dict[str, dict[str, torch.Tensor]] = {}
        for key in stored.keys() - tensors.keys():
            partner, _, name = key.removeprefix(INTERACTION_PREFIX).partition("/")
            interactions.setdefault(partner, {})[name] = stored[key]
        delta = cls(tensors=tensors, metadata=metadata, interactions=interactions)
        delta.validate(source=str(path))
        return delta

    def validate(self, source: str = "delta") -> None:
        """Check the metadata (required keys, a format version this code reads) and finite tensors."""
        missing = [key for key in REQUIRED_METADATA if key not in self.metadata]
        if missing:
            raise ValueError(f"{source} lacks metadata {missing}: it is not a ConceptDelta file.")
        try:
            version = int(self.metadata["format_version"])
        except ValueError as error:
            raise ValueError(
                f"{source} has an unreadable format_version {self.metadata['format_version']!r}."
            ) from error
        if version > FORMAT_VERSION:
            raise ValueError(
                f"{source} has format version {version}, newer than this code reads ({FORMAT_VERSION}): "
                "upgrade d3pm-hub."
            )
        if version < 1:
            raise ValueError(f"{source} has format version {version}; versions start at 1.")
        self._validate_json_metadata(source)
        if not self.tensors:
            raise ValueError(f"{source} holds no increments.")
        for name, value in (self.tensors | self.interaction_tensors()).items():
            if not torch.isfinite(value).all():
                raise ValueError(f"{source}: increment {name!r} has non-finite values (NaN or inf).")
        if self.interactions and set(self.interactions) != set(json.loads(self.metadata.get("interactions", "{}"))):
            raise ValueError(f"{source}: its pair terms and its metadata's 'interactions' name different partners.")

    def _validate_json_metadata(self, source: str) -> None:
        """``concepts`` a non-empty JSON list of digits; ``hyperparameters``, ``metrics``, ``interactions`` JSON
        objects; recorded ``anchors`` map erased digits to non-empty lists of digits."""

        def parsed(key: str, default: str, kind: type):
            try:
                value = json.loads(self.metadata.get(key, default))
            except json.JSONDecodeError as error:
                raise ValueError(f"{source}: metadata {key!r} is not valid JSON ({error}).") from error
            if not isinstance(value, kind):
                raise ValueError(f"{source}: metadata {key!r} must be a JSON {kind.__name__}, got {value!r:.80}.")
            return value

        def digits(value) -> bool:
            return isinstance(value, list) and bool(value) and all(is_digit(d) for d in value)

        def is_digit(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= 0

        if not digits(parsed("concepts", "[]", list)):
            raise ValueError(
                f"{source}: metadata 'concepts' must list the erased digits, got {self.metadata['concepts']!r}."
            )
        parsed("metrics", "{}", dict)
        parsed("interactions", "{}", dict)
        anchors = parsed("hyperparameters", "{}", dict).get("anchors") or {}
        if not isinstance(anchors, dict) or not all(
            key.isdigit() and digits(ranked) for key, ranked in anchors.items()
        ):
            raise ValueError(
                f"{source}: hyperparameters 'anchors' must map digits to lists of digits, got {anchors!r:.80}."
            )


DeltaSpec = ConceptDelta | tuple[ConceptDelta, float]
"""A delta at strength 1, or a (delta, strength) pair."""


def base_model_hash(unet: torch.nn.Module) -> str:
    """sha256 over the sorted (name, float32 bytes) of every parameter: the identity of a base model."""
    digest = hashlib.sha256()
    for name, parameter in sorted(unet.named_parameters()):
        digest.update(name.encode())
        digest.update(parameter.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _normalise(deltas: Iterable[DeltaSpec]) -> list[tuple[ConceptDelta, float]]:
    """``[delta | (delta, strength)]`` → ``[(delta, strength)]`` with finite float strengths."""
    pairs = []
    for item in deltas:
        delta, strength = item if isinstance(item, tuple) else (item, 1.0)
        if not isinstance(delta, ConceptDelta):
            raise TypeError(f"Expected a ConceptDelta or (ConceptDelta, strength), got {type(delta).__name__}.")
        if not isinstance(strength, (int, float)) or not math.isfinite(strength):
            raise ValueError(f"Delta strength must be a finite number, got {strength!r}.")
        pairs.append((delta, float(strength)))
    return pairs


def _compose(
    base_parameters: dict[str, torch.Tensor], base_hash: str, deltas: Iterable[DeltaSpec]
) -> dict[str, torch.Tensor]:
    """θ₀ + Σ sᵢ Δᵢ for the parameters the deltas touch, after checking each delta against the base.

    Deltas that anchor an erased label onto another digit (``separable``) get the closed-form correction of
    `~d3pm_hub.erasure.anchors.anchor_corrections` when that digit is erased in the same composition, and pairs of
    deltas with pair terms for each other get s_a s_b Δ_ab (`~d3pm_hub.erasure.interactions`).
    """
    from .erasure.anchors import anchor_corrections  # erasure builds on this module: import at call time
    from .erasure.interactions import interaction_corrections

    pairs = _normalise(deltas)
    composed: dict[str, torch.Tensor] = {}
    for delta, strength in pairs:
        label = f"delta {delta.metadata.get('method', '?')} for concepts {delta.metadata.get('concepts', '?')}"
        delta.validate(label)
        if delta.metadata["base_model_hash"] != base_hash:
            raise ValueError(
                f"The {label} was made for another base model (hash {delta.metadata['base_model_hash'][:12]}…, "
                f"this model {base_hash[:12]}…, from {delta.metadata.get('base_model') or 'an unknown model'})."
            )
        unknown = sorted(set(delta.tensors) - set(base_parameters))
        if unknown:
            raise ValueError(f"The {label} edits parameters this model does not have: {unknown[:5]}.")
        for name, increment in delta.tensors.items():
            base = base_parameters[name]
            if increment.shape != base.shape:
                raise ValueError(
                    f"The {label} has shape {tuple(increment.shape)} for {name!r}, the model {tuple(base.shape)}."
                )
            current = composed.get(name, base)
            composed[name] = current + strength * increment.to(device=base.device, dtype=base.dtype)
    for name, increment in interaction_corrections(base_parameters, pairs).items():
        composed[name] = composed.get(name, base_parameters[name]) + increment.to(base_parameters[name].device)
    corrections = anchor_corrections(base_parameters, composed, pairs)
    return {
        name: value + corrections[name].to(value.device) if name in corrections else value
        for name, value in composed.items()
    }


def compose_parameters(unet: torch.nn.Module, deltas: Iterable[DeltaSpec]) -> dict[str, torch.Tensor]:
    """θ = θ₀ + Σᵢ sᵢ Δᵢ for the parameters the deltas touch (others are not in the dict).

    Args:
        unet: the base model θ₀ (its current weights must hash to each delta's ``base_model_hash``).
        deltas: ``ConceptDelta`` objects (strength 1) or ``(delta, strength)`` pairs; strengths in 0 … 1 and
            beyond for experiments.

    Returns: name → new tensor, for ``pipeline(..., unet_parameters=...)`` (applied for that call only).

    Raises:
        ValueError: a delta made for another base model, unknown parameter names, wrong shapes, non-finite values,
            or a UNet with deltas applied in place.
    """
    if unet in _APPLIED:
        raise ValueError(
            "This UNet has deltas applied in place (apply_deltas): weights composed on top would mix them with "
            "these. Call remove_deltas(pipeline) first, or pass all the deltas here."
        )
    parameters = {name: p.detach() for name, p in unet.named_parameters()}
    return _compose(parameters, base_model_hash(unet), deltas)


@dataclass
class _AppliedState:
    """What `apply_deltas` changed in place: base copies of the touched tensors and the base hash."""

    base_tensors: dict[str, torch.Tensor]
    base_hash: str
    deltas: list[tuple[ConceptDelta, float]]


_APPLIED: weakref.WeakKeyDictionary[torch.nn.Module, _AppliedState] = weakref.WeakKeyDictionary()  # by UNet
_LOCKS: weakref.WeakKeyDictionary[D3PMPipeline, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _lock_for(pipeline: D3PMPipeline) -> threading.RLock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(pipeline, threading.RLock())


def _base_parameters(pipeline: D3PMPipeline) -> tuple[dict[str, torch.Tensor], str]:
    """The base θ₀ (undoing in-place deltas, without touching the model) and its hash."""
    parameters = {name: p.detach() for name, p in pipeline.unet.named_parameters()}
    state = _APPLIED.get(pipeline.unet)
    if state is None:
        return parameters, base_model_hash(pipeline.unet)
    return {**parameters, **state.base_tensors}, state.base_hash


def base_hash_of(pipeline: D3PMPipeline) -> str:
    """`base_model_hash` of the pipeline's UNet as it is without the deltas applied in place."""
    return _base_parameters(pipeline)[1]


def apply_deltas(pipeline: D3PMPipeline, deltas: Iterable[DeltaSpec]) -> None:
    """Add deltas to the pipeline's UNet in place (on top of any applied before); `remove_deltas` undoes all.

    The base tensors of every touched parameter are kept, so removal is exact. In-place weights are shared by
    every caller of this pipeline: for concurrent requests use `compose_parameters` + ``unet_parameters``.
    """
    with _lock_for(pipeline), torch.no_grad():
        base, base_hash = _base_parameters(pipeline)
        state = _APPLIED.get(pipeline.unet) or _AppliedState({}, base_hash, [])
        all_deltas = state.deltas + _normalise(deltas)
        composed = _compose(base, base_hash, all_deltas)  # validates everything before anything changes
        named = dict(pipeline.unet.named_parameters())
        for name, value in composed.items():
            state.base_tensors.setdefault(name, named[name].detach().clone())
            named[name].copy_(value)
        state.deltas = all_deltas
        _APPLIED[pipeline.unet] = state


def remove_deltas(pipeline: D3PMPipeline) -> None:
    """Put back the base tensors bit for bit (a no-op when nothing is applied)."""
    with _lock_for(pipeline), torch.no_grad():
        state = _APPLIED.pop(pipeline.unet, None)
        if state is None:
            return
        named = dict(pipeline.unet.named_parameters())
        for name, base in state.base_tensors.items():
            named[name].copy_(base)


def applied_deltas(pipeline: D3PMPipeline) -> list[tuple[ConceptDelta, float]]:
    """The (delta, strength) pairs currently applied in place."""
    state = _APPLIED.get(pipeline.unet)
    return list(state.deltas) if state else []


@contextmanager
def deltas_applied(pipeline: D3PMPipeline, deltas: Iterable[DeltaSpec]) -> Iterator[D3PMPipeline]:
    """Apply deltas in place for the ``with`` block, then restore exactly.

    Holds the pipeline's lock for the whole block, so two threads using this context manager on the same
    pipeline take turns rather than mixing weights (the per-request, lock-free path is ``unet_parameters``).
    """
    with _lock_for(pipeline):
        before = applied_deltas(pipeline)
        apply_deltas(pipeline, deltas)
        try:
            yield pipeline
        finally:
            remove_deltas(pipeline)
            if before:
                apply_deltas(pipeline, before)


def fuse(pipeline: D3PMPipeline, deltas: Iterable[DeltaSpec]) -> D3PMPipeline:
    """A standalone copy of the pipeline with θ₀ + Σ sᵢ Δᵢ baked in (``save_pretrained`` gives one model)."""
    with _lock_for(pipeline):
        base, base_hash = _base_parameters(pipeline)
        composed = _compose(base, base_hash, deltas)
        unet = copy.deepcopy(pipeline.unet)
        with torch.no_grad():
            for name, parameter in unet.named_parameters():
                parameter.copy_(composed.get(name, base[name]))
    return D3PMPipeline(unet=unet, scheduler=copy.deepcopy(pipeline.scheduler))
