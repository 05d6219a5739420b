"""The app's engine, free of any UI: validated settings → a grid of samples per digit + the classifier's rates.

Every request is independent of every other one running at the same time:

* **weights** — the request's deltas are composed into a fresh parameter dict
  (:func:`~d3pm_hub.deltas.compose_parameters`, θ₀ + Σ sᵢΔᵢ) that only this request sees, and handed to the
  pipeline as ``unet_parameters``. ``torch.func.functional_call`` swaps those tensors *into the module* for the
  duration of the call, so a module must never run two calls at once: each request borrows one of
  ``max_concurrent_requests`` private UNet replicas (:class:`UNetPool`) and returns it afterwards. The base UNet
  itself never runs and is only read (θ₀ for composing).
* **sampler state** — ``scheduler.set_timesteps`` assigns attributes, so each request samples through its own
  pipeline object holding a shallow copy of the scheduler (the big transition tables are shared: read-only, and
  their per-device cache only ever gains identical entries).
* **randomness** — each request draws from its own ``torch.Generator`` seeded with the request's seed.

Results are cached per normalised settings (LRU), so moving a slider back, or the base model's comparison grid for
the same sampler settings, costs nothing the second time.
"""

from __future__ import annotations

import copy
import math
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image

from d3pm_hub.deltas import ConceptDelta, compose_parameters
from d3pm_hub.evaluation import classify, load_classifier
from d3pm_hub.evaluation.classifier import DigitClassifier
from d3pm_hub.paths import DEFAULT_PIPELINE, PRETRAINED
from d3pm_hub.pipeline import DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_INFERENCE_STEPS, D3PMPipeline
from d3pm_hub.unet import D3PMUNet

NUM_DIGITS = 10
DEFAULT_DELTAS_FOLDER = PRETRAINED / "deltas"
# The pipeline's defaults (chosen in BENCHMARKS.md): 15 steps without guidance meet the quality bar, and a grid of
# 10 digits costs 15 forward passes of 10 images (guidance would double the batch).
DEFAULT_SEED = 0
# The shipped default (BENCHMARKS.md, erasure): removes the digit from its label and from unconditional samples.
DEFAULT_METHOD = "separable"
DEFAULT_SAMPLES_PER_DIGIT = 1
DEFAULT_MAX_CONCURRENT_REQUESTS = 2
MAX_NUM_INFERENCE_STEPS = 100
MAX_GUIDANCE_SCALE = 10.0
MAX_SAMPLES_PER_DIGIT = 8
MAX_SEED = 2**32 - 1
TILE_SCALE = 4  # 28 px digits are drawn at 112 px, with nearest-neighbour upscaling so pixels stay crisp

ProgressCallback = Callable[[float, str], None]


@dataclass(frozen=True)
class GridSettings:
    """Everything that determines a grid; hashable, so it is the cache key.

    Attributes:
        method: the erasure method whose deltas are composed (a folder name under the deltas folder), or None
            when every strength is 0.
        strengths: erasure strength per digit 0..9 (0 = intact, 1 = the delta as shipped).
        guidance_scale: classifier-free guidance scale s.
        num_inference_steps: reverse steps of the sampler.
        seed: seed of the request's generator (same seed → same starting noise for every setting).
        samples_per_digit: n, images per digit.
    """

    method: str | None
    strengths: tuple[float, ...]
    guidance_scale: float
    num_inference_steps: int
    seed: int
    samples_per_digit: int

    @property
    def is_base(self) -> bool:
        """True when no delta is applied (the grid is the base model's)."""
        return not any(self.strengths)

    def base(self) -> GridSettings:
        """The same sampler settings with every delta removed."""
        return replace(self, method=None, strengths=(0.0,) * NUM_DIGITS)


@dataclass(frozen=True)
class Grid:
    """Samples of one :class:`GridSettings`.

    Attributes:
        images: ``(10 · n, 1, 28, 28)`` float in [0, 1], digit-major: rows ``d·n … d·n + n − 1`` are digit d.
        predictions: ``(10, n)`` the classifier's reading of each image.
    """

    images: torch.Tensor
    predictions: torch.Tensor

    def digit_rates(self) -> list[float]:
        """Per digit d, the fraction of d's samples the classifier reads as d (10 floats)."""
        digits = torch.arange(NUM_DIGITS)[:, None]
        return (self.predictions == digits).float().mean(1).tolist()

    def tiles(self) -> list[Image.Image]:
        """One image per digit: its n samples side by side, upscaled ``TILE_SCALE``×."""
        per_digit = self.images.view(NUM_DIGITS, -1, *self.images.shape[-2:])  # (10, n, H, W)
        tiles = []
        for samples in per_digit:
            row = torch.cat(list(samples), dim=1)  # (H, n·W)
            pixels = (row * 255).round().to(torch.uint8).numpy()
            tile = Image.fromarray(pixels, mode="L")
            tiles.append(tile.resize((tile.width * TILE_SCALE, tile.height * TILE_SCALE), Image.NEAREST))
        return tiles


@dataclass(frozen=True)
class GridResult:
    """What a request returns: the edited grid, the base model's grid at the same sampler settings, timing."""

    settings: GridSettings
    grid: Grid
    base_grid: Grid
    seconds: float

    def summary(self) -> dict:
        """JSON-friendly numbers: settings, per-digit rates (base and now), each sample's reading, seconds."""
        return {
            "method": self.settings.method,
            "strengths": list(self.settings.strengths),
            "guidance_scale": self.settings.guidance_scale,
            "num_inference_steps": self.settings.num_inference_steps,
            "seed": self.settings.seed,
            "samples_per_digit": self.settings.samples_per_digit,
            "digit_rate_base": self.base_grid.digit_rates(),
            "digit_rate_now": self.grid.digit_rates(),
            "read_as": self.grid.predictions.tolist(),
            "seconds": round(self.seconds, 3),
        }


class UNetPool:
    """Private replicas of a UNet, lent to one request at a time (``functional_call`` mutates the module it runs).

    Args:
        unet: the model to replicate (deep copies; the original is never lent).
        size: number of replicas = the most requests that can sample at once; more wait for a free one.
    """

    def __init__(self, unet: D3PMUNet, size: int):
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size}.")
        self._free: queue.SimpleQueue[D3PMUNet] = queue.SimpleQueue()
        for _ in range(size):
            self._free.put(copy.deepcopy(unet).eval().requires_grad_(False))

    @contextmanager
    def borrow(self) -> Iterator[D3PMUNet]:
        """A replica for the duration of the ``with`` block (blocks while all are lent)."""
        unet = self._free.get()
        try:
            yield unet
        finally:
            self._free.put(unet)


def discover_deltas(folder: str | Path) -> dict[str, dict[int, ConceptDelta]]:
    """Load ``{folder}/{method}/digit-{d}.safetensors`` for every method folder: ``{method: {digit: delta}}``.

    A missing folder means no methods; method folders without any digit file are left out.
    """
    folder = Path(folder)
    methods: dict[str, dict[int, ConceptDelta]] = {}
    if not folder.is_dir():
        return methods
    for method_folder in sorted(path for path in folder.iterdir() if path.is_dir()):
        files = {d: method_folder / f"digit-{d}.safetensors" for d in range(NUM_DIGITS)}
        deltas = {d: ConceptDelta.load(path) for d, path in files.items() if path.is_file()}
        if deltas:
            methods[method_folder.name] = deltas
    return methods


class EraserService:
    """Samples a grid of every digit with per-digit erasure strengths; thread-safe, cached.

    Args:
        pipeline: the base pipeline (never modified).
        classifier: reads each sample as a digit for the rates.
        deltas: ``{method: {digit: delta}}`` (see :func:`discover_deltas`).
        max_concurrent_requests: requests that may sample at the same time (UNet replicas; the app's queue uses
            the same number as its concurrency limit).
        cache_size: grids kept (least recently used dropped first); 0 disables the cache.

    Raises:
        ValueError: a model without 10 digit labels, or a delta that does not fit it (another base model, a
            file whose concepts are not its digit).
    """

    def __init__(
        self,
        pipeline: D3PMPipeline,
        classifier: DigitClassifier,
        deltas: dict[str, dict[int, ConceptDelta]],
        max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS,
        cache_size: int = 128,
    ):
        if pipeline.unet.config.num_labels != NUM_DIGITS:
            raise ValueError(f"The app needs a model of {NUM_DIGITS} digits, got {pipeline.unet.config.num_labels}.")
        for method, by_digit in deltas.items():
            for digit, delta in by_digit.items():
                if digit not in delta.concepts:
                    raise ValueError(f"The {method} delta for digit {digit} erases {delta.concepts}, not {digit}.")
            compose_parameters(pipeline.unet, list(by_digit.values()))  # refuses deltas made for another model
        self.pipeline = pipeline
        self.classifier = classifier.eval()
        self.deltas = deltas
        self.max_concurrent_requests = max_concurrent_requests
        self._unets = UNetPool(pipeline.unet, max_concurrent_requests)
        self._cache_size = cache_size
        self._cache: OrderedDict[GridSettings, Grid] = OrderedDict()
        self._cache_lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path = DEFAULT_PIPELINE,
        deltas_folder: str | Path = DEFAULT_DELTAS_FOLDER,
        classifier_path: str | Path | None = None,
        **kwargs,
    ) -> EraserService:
        """Load the pipeline (folder or Hub repo id), the deltas and the classifier (default: the shipped one)."""
        pipeline = D3PMPipeline.from_pretrained(model)
        return cls(pipeline, load_classifier(classifier_path), discover_deltas(deltas_folder), **kwargs)

    def warm_up(self) -> GridResult:
        """Sample the base grid at the default settings, so the page's first grid (and every default-settings
        request with deltas, which compares against it) comes from the cache."""
        return self.generate(self.settings(None, (0.0,) * NUM_DIGITS))

    @property
    def methods(self) -> list[str]:
        """Erasure methods with at least one delta: the default method first, then the rest sorted."""
        return sorted(self.deltas, key=lambda method: (method != DEFAULT_METHOD, method))

    @property
    def max_num_inference_steps(self) -> int:
        """Upper bound of the steps setting (the model's T, at most ``MAX_NUM_INFERENCE_STEPS``)."""
        return min(MAX_NUM_INFERENCE_STEPS, self.pipeline.scheduler.config.num_train_timesteps)

    def settings(
        self,
        method: str | None,
        strengths: list[float] | tuple[float, ...],
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
        seed: int = DEFAULT_SEED,
        samples_per_digit: int = DEFAULT_SAMPLES_PER_DIGIT,
    ) -> GridSettings:
        """Validate raw values (from the UI or the API) into :class:`GridSettings`.

        Raises:
            ValueError: with a message naming the offending value and its allowed range.
        """
        strengths = tuple(strengths)
        if len(strengths) != NUM_DIGITS:
            raise ValueError(f"Give one strength per digit 0..9 ({NUM_DIGITS} values), got {len(strengths)}.")
        for digit, strength in enumerate(strengths):
            _check_number(f"strength_{digit}", strength, 0.0, 1.0)
        _check_number("guidance_scale", guidance_scale, 0.0, MAX_GUIDANCE_SCALE)
        max_steps = self.max_num_inference_steps
        num_inference_steps = _check_integer("num_inference_steps", num_inference_steps, 1, max_steps)
        seed = _check_integer("seed", seed, 0, MAX_SEED)
        samples_per_digit = _check_integer("samples_per_digit", samples_per_digit, 1, MAX_SAMPLES_PER_DIGIT)
        strengths = tuple(float(strength) for strength in strengths)
        if any(strengths):
            if method not in self.deltas:
                shipped = ", ".join(self.methods) or "none are installed"
                raise ValueError(f"Unknown erasure method {method!r}; choose one of: {shipped}.")
            missing = [d for d, strength in enumerate(strengths) if strength and d not in self.deltas[method]]
            if missing:
                raise ValueError(f"Method {method!r} has no delta for digit(s) {missing}: set their strength to 0.")
        else:
            method = None  # no delta applied: the same grid whatever the method, so one cache entry
        return GridSettings(method, strengths, float(guidance_scale), num_inference_steps, seed, samples_per_digit)

    def generate(self, settings: GridSettings, progress: ProgressCallback | None = None) -> GridResult:
        """The grid for ``settings`` and the base model's grid at the same sampler settings (both cached).

        Args:
            settings: from :meth:`settings`.
            progress: called as ``progress(fraction, description)`` before each stage.
        """
        report = progress or (lambda fraction, description: None)
        start = time.perf_counter()
        grid = self._grid(settings, report, 0.0, 0.5 if not settings.is_base else 1.0)
        base_grid = grid if settings.is_base else self._grid(settings.base(), report, 0.5, 1.0)
        return GridResult(settings, grid, base_grid, time.perf_counter() - start)

    def _grid(self, settings: GridSettings, report: ProgressCallback, begin: float, end: float) -> Grid:
        """Cached :meth:`_sample`; ``begin``/``end`` is this grid's share of the request's progress bar."""
        with self._cache_lock:
            if settings in self._cache:
                self._cache.move_to_end(settings)
                return self._cache[settings]
        who = "base model" if settings.is_base else f"{settings.method} deltas"
        report(begin, f"Sampling {NUM_DIGITS} × {settings.samples_per_digit} digits ({who})")
        grid = self._sample(settings)
        report(end, "Done")
        if self._cache_size:
            with self._cache_lock:
                self._cache[settings] = grid
                self._cache.move_to_end(settings)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return grid

    def _unet_parameters(self, settings: GridSettings) -> dict[str, torch.Tensor] | None:
        """θ₀ + Σ sᵢΔᵢ for the parameters the chosen deltas touch (None for the base model)."""
        if settings.is_base:
            return None
        chosen = [(self.deltas[settings.method][d], s) for d, s in enumerate(settings.strengths) if s]
        return compose_parameters(self.pipeline.unet, chosen)

    def _sample(self, settings: GridSettings) -> Grid:
        """Sample every digit (digit-major, one pipeline call) and classify the images."""
        labels = [digit for digit in range(NUM_DIGITS) for _ in range(settings.samples_per_digit)]
        unet_parameters = self._unet_parameters(settings)
        with self._unets.borrow() as unet:
            pipeline = D3PMPipeline(unet=unet, scheduler=copy.copy(self.pipeline.scheduler))
            pipeline.set_progress_bar_config(disable=True)
            images = pipeline(
                labels,
                num_inference_steps=settings.num_inference_steps,
                guidance_scale=settings.guidance_scale,
                generator=torch.Generator().manual_seed(settings.seed),
                output_type="pt",
                unet_parameters=unet_parameters,
            ).images
        predictions, _ = classify(self.classifier, images)
        return Grid(images, predictions.view(NUM_DIGITS, settings.samples_per_digit))


def _check_number(name: str, value: object, minimum: float, maximum: float) -> None:
    """Raise ValueError unless ``value`` is a real number in [minimum, maximum]."""
    allowed = f"{minimum}…{maximum}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number in {allowed}, got {value!r}.")
    if not minimum <= value <= maximum:
        raise ValueError(f"{name} must lie in {allowed}, got {value!r}.")


def _check_integer(name: str, value: object, minimum: int, maximum: int) -> int:
    """``value`` as an int if it is a whole number in [minimum, maximum], else ValueError."""
    _check_number(name, value, minimum, maximum)
    if value != int(value):
        raise ValueError(f"{name} must be a whole number, got {value!r}.")
    return int(value)
