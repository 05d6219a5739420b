"""The app: its engine called directly, its Gradio handler, and the served app through ``gradio_client``.

Fast tests use a tiny random pipeline and a hand-made delta per digit that maps the digit's label embedding onto
the null label's. With classifier-free guidance that delta at strength 1 makes the digit's conditional prediction
equal the unconditional one, so "erasing 9" has an exact, checkable meaning even for an untrained model: the 9
tile becomes what the null label draws from the same noise. The shipped weights and deltas are checked
separately (``slow``) for the real effect: the classifier reads far fewer 9s.
"""

from __future__ import annotations

import math
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd
import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image

from d3pm_hub.app import API_NAME, EraserService, build_demo, discover_deltas, launch
from d3pm_hub.app.service import NUM_DIGITS
from d3pm_hub.app.ui import make_generate_handler
from d3pm_hub.deltas import ConceptDelta
from d3pm_hub.evaluation import load_classifier
from d3pm_hub.paths import DEFAULT_PIPELINE, PRETRAINED
from d3pm_hub.pipeline import D3PMPipeline

from .conftest import tiny_pipeline

METHOD = "null-label"
NULL_LABEL = NUM_DIGITS
FAST = dict(guidance_scale=2.0, num_inference_steps=3)  # tiny model, few steps: each grid takes milliseconds


def make_app_folder(root: Path) -> tuple[Path, Path]:
    """A tiny pipeline saved to ``root/pipeline`` and a hand-made delta per digit in ``root/deltas/null-label``.

    Digit d's delta moves row d of the label embedding onto the null label's row (Δ = E[null] − E[d]).
    """
    pipeline = tiny_pipeline()
    pipeline.save_pretrained(root / "pipeline")
    embedding = pipeline.unet.label_embedding.weight.detach()
    for digit in range(NUM_DIGITS):
        increment = torch.zeros_like(embedding)
        increment[digit] = embedding[NULL_LABEL] - embedding[digit]
        delta = ConceptDelta.create(pipeline.unet, {"label_embedding.weight": increment}, [digit], METHOD)
        delta.save(root / "deltas" / METHOD / f"digit-{digit}.safetensors", dtype=torch.float32)
    return root / "pipeline", root / "deltas"


def make_service(folder: tuple[Path, Path], **kwargs) -> EraserService:
    """A service over the tiny pipeline and its hand-made deltas, on the shipped classifier."""
    pipeline_folder, deltas_folder = folder
    return EraserService.from_pretrained(pipeline_folder, deltas_folder, **kwargs)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def served(service: EraserService) -> Iterator[str]:
    """The app on 127.0.0.1 at a free port for the ``with`` block; yields its URL."""
    demo = build_demo(service)
    port = free_port()
    launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def app_folder(tmp_path_factory) -> tuple[Path, Path]:
    return make_app_folder(tmp_path_factory.mktemp("app"))


@pytest.fixture(scope="module")
def service(app_folder) -> EraserService:
    return make_service(app_folder, max_concurrent_requests=4)


@pytest.fixture(scope="module")
def base_pipeline(app_folder) -> D3PMPipeline:
    """The tiny pipeline loaded on its own (the service's copy is never called directly)."""
    pipeline = D3PMPipeline.from_pretrained(app_folder[0])
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def app_url(service) -> Iterator[str]:
    with served(service) as url:
        yield url


def strengths(**by_digit: float) -> list[float]:
    """Ten strengths, 0 except the digits given as ``d9=1.0``."""
    return [by_digit.get(f"d{digit}", 0.0) for digit in range(NUM_DIGITS)]


def direct_images(pipeline: D3PMPipeline, labels: list[int], seed: int, **sampler) -> torch.Tensor:
    """The pipeline called directly, as the app would call it: ``(B, 1, 28, 28)`` in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    return pipeline(labels, generator=generator, output_type="pt", **sampler).images


def make_client(url: str, download_folder: Path) -> Client:
    """A client that saves files in its own folder: clients sharing Gradio's default temp folder with the
    in-process server would overwrite the server's copies of identical files while they are being sent."""
    download_folder.mkdir(parents=True, exist_ok=True)
    return Client(url, verbose=False, download_files=download_folder)


def tile_pixels(image: Image.Image | str | Path) -> np.ndarray:
    """Grey pixels of a gallery tile (a PIL image or a file the client downloaded)."""
    image = Image.open(image) if isinstance(image, (str, Path)) else image
    return np.asarray(image.convert("L"))


# ---------------------------------------------------------------------------------------------- the engine
def test_strength_zero_reproduces_the_base_model(service, base_pipeline):
    settings = service.settings(METHOD, strengths(), seed=7, samples_per_digit=2, **FAST)
    result = service.generate(settings)
    labels = [digit for digit in range(NUM_DIGITS) for _ in range(2)]
    expected = direct_images(base_pipeline, labels, seed=7, **FAST)
    assert torch.equal(result.grid.images, expected)
    assert result.base_grid is result.grid


def test_erasing_nine_turns_its_samples_into_null_label_samples(service, base_pipeline):
    settings = service.settings(METHOD, strengths(d9=1.0), seed=3, samples_per_digit=2, **FAST)
    result = service.generate(settings)
    labels = [digit if digit != 9 else NULL_LABEL for digit in range(NUM_DIGITS) for _ in range(2)]
    expected = direct_images(base_pipeline, labels, seed=3, **FAST)
    assert torch.equal(result.grid.images, expected)
    base = result.base_grid.images
    assert torch.equal(result.grid.images[:18], base[:18]), "digits 0-8 must not change"
    assert not torch.equal(result.grid.images[18:], base[18:])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(strengths=strengths(d9=1.5)), "strength_9 must lie in 0.0…1.0, got 1.5"),
        (dict(strengths=strengths(d3=-0.1)), "strength_3 must lie in 0.0…1.0"),
        (dict(strengths=[0.0] * 9), "one strength per digit"),
        (dict(strengths=strengths(d0=math.nan)), "strength_0 must be a number"),
        (dict(guidance_scale=math.inf), "guidance_scale must be a number"),
        (dict(num_inference_steps=0), "num_inference_steps must lie in 1…50"),
        (dict(num_inference_steps=2.5), "num_inference_steps must be a whole number"),
        (dict(seed=-1), "seed must lie in 0…"),
        (dict(samples_per_digit="4"), "samples_per_digit must be a number"),
        (dict(method="nope", strengths=strengths(d9=1.0)), "Unknown erasure method 'nope'; choose one of: null-label"),
    ],
)
def test_invalid_settings_get_a_clear_message(service, changes, message):
    values = dict(method=METHOD, strengths=strengths(), guidance_scale=2.0, num_inference_steps=3, seed=0)
    values.update(samples_per_digit=1)
    values.update(changes)
    with pytest.raises(ValueError, match=message):
        service.settings(**values)


def test_any_method_name_is_fine_while_nothing_is_erased(service):
    assert service.settings("nope", strengths()) == service.settings(METHOD, strengths())


def test_results_are_cached_per_settings(service):
    settings = service.settings(METHOD, strengths(d4=0.5), seed=11, **FAST)
    first, second = service.generate(settings), service.generate(settings)
    assert second.grid is first.grid and second.base_grid is first.base_grid


def test_a_delta_for_another_base_model_is_refused(base_pipeline, tmp_path):
    other = tiny_pipeline(seed=1)
    delta = ConceptDelta.create(other.unet, {"label_embedding.weight": torch.zeros(11, 32)}, [9], METHOD)
    delta.save(tmp_path / METHOD / "digit-9.safetensors")
    with pytest.raises(ValueError, match="made for another base model"):
        EraserService(base_pipeline, load_classifier(), discover_deltas(tmp_path))


def test_without_deltas_the_app_serves_the_base_model(base_pipeline, tmp_path):
    service = EraserService(base_pipeline, load_classifier(), discover_deltas(tmp_path / "missing"))
    assert service.methods == []
    build_demo(service)
    assert service.generate(service.settings(None, strengths(), **FAST)).settings.is_base
    with pytest.raises(ValueError, match="none are installed"):
        service.settings(None, strengths(d9=1.0))


def distinct_strengths(count: int) -> list[list[float]]:
    """``count`` different strength settings (one or two digits erased, at different strengths)."""
    settings = []
    for i in range(count):
        first, second = i % 10, (3 * i + 1) % 10  # never equal: 2i + 1 is odd
        settings.append(strengths(**{f"d{first}": 1.0 - (i // 10) / 2, f"d{second}": 0.25 + (i % 3) / 4}))
    assert len({tuple(values) for values in settings}) == count
    return settings


def test_concurrent_requests_equal_their_sequential_twins(app_folder):
    """16 threads at once on 4 UNet replicas; results equal a fresh service's one-at-a-time results."""
    settings_list = distinct_strengths(16)
    concurrent = make_service(app_folder, max_concurrent_requests=4)
    sequential = make_service(app_folder, max_concurrent_requests=1)
    barrier = threading.Barrier(len(settings_list))

    def run_together(values: list[float]) -> torch.Tensor:
        settings = concurrent.settings(METHOD, values, seed=5, **FAST)
        barrier.wait()
        return concurrent.generate(settings).grid.images

    with ThreadPoolExecutor(len(settings_list)) as pool:
        together = list(pool.map(run_together, settings_list))
    for values, images in zip(settings_list, together, strict=True):
        assert torch.equal(images, sequential.generate(sequential.settings(METHOD, values, seed=5, **FAST)).grid.images)


# ----------------------------------------------------------------------------------------------- the handler
def test_handler_returns_a_captioned_tile_per_digit_and_the_rates(service):
    generate = make_generate_handler(service)
    gallery, chart, numbers, status = generate(METHOD, *strengths(d9=1.0), 2.0, 3, 0, 2)
    assert len(gallery) == NUM_DIGITS
    tile, caption = gallery[9]
    assert caption.startswith("9 (100%) → ")
    assert Image.open(tile).size == (2 * 28 * 4, 28 * 4)
    assert gallery[0][1].startswith("0 → ")
    assert isinstance(chart, pd.DataFrame) and len(chart) == 2 * NUM_DIGITS
    assert set(chart["model"]) == {"base", "now"} and chart["rate"].between(0, 1).all()
    assert numbers["strengths"][9] == 1.0 and len(numbers["read_as"]) == NUM_DIGITS
    assert "erasing 9 (100%)" in status


def test_handler_turns_bad_input_into_a_gradio_error(service):
    generate = make_generate_handler(service)
    with pytest.raises(gr.Error, match="strength_9 must lie in 0.0…1.0, got 7"):
        generate(METHOD, *strengths(d9=7), 2.0, 3, 0, 1)


# ------------------------------------------------------------------------------------------ the served app
def test_client_generate_returns_images(app_url, tmp_path):
    client = make_client(app_url, tmp_path)
    gallery, chart, numbers, status = client.predict(
        strength_9=1.0, num_inference_steps=3, samples_per_digit=2, api_name=f"/{API_NAME}"
    )
    assert len(gallery) == NUM_DIGITS
    assert gallery[9]["caption"].startswith("9 (100%) → ")
    assert Image.open(gallery[9]["image"]).size == (2 * 28 * 4, 28 * 4)
    assert numbers["strengths"][9] == 1.0 and numbers["samples_per_digit"] == 2
    assert "erasing 9" in status


def test_client_api_lists_named_parameters(app_url, tmp_path):
    api = make_client(app_url, tmp_path).view_api(print_info=False, return_format="dict")
    endpoint = api["named_endpoints"][f"/{API_NAME}"]
    names = [parameter["parameter_name"] for parameter in endpoint["parameters"]]
    assert names == [
        "method",
        *(f"strength_{d}" for d in range(NUM_DIGITS)),
        "guidance_scale",
        "num_inference_steps",
        "seed",
        "samples_per_digit",
    ]
    assert list(api["named_endpoints"]) == [f"/{API_NAME}"], "UI-only events stay out of the API"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(strength_9=2.0), "greater than maximum value 1"),
        (dict(num_inference_steps=0), "less than minimum value 1"),
        (dict(seed=-5), "less than minimum value 0"),
        (dict(method="nope"), "not in the list of choices"),
        (dict(method=None, strength_9=1.0), "Unknown erasure method None"),
    ],
)
def test_client_out_of_range_values_get_a_clear_error(app_url, tmp_path, arguments, message):
    client = make_client(app_url, tmp_path)
    with pytest.raises(AppError, match=message) as error:
        client.predict(**arguments, api_name=f"/{API_NAME}")
    assert "Traceback" not in str(error.value)


def test_sixteen_concurrent_clients_equal_their_sequential_twins(app_url, app_folder, tmp_path):
    settings_list = distinct_strengths(16)
    clients = [make_client(app_url, tmp_path / f"client-{i}") for i in range(len(settings_list))]
    jobs = [
        client.submit(METHOD, *values, *FAST.values(), 100, 1, api_name=f"/{API_NAME}")
        for client, values in zip(clients, settings_list, strict=True)
    ]
    results = [job.result(timeout=120) for job in jobs]
    twin_service = make_service(app_folder, max_concurrent_requests=1)
    for values, (gallery, _, numbers, _) in zip(settings_list, results, strict=True):
        twin = twin_service.generate(twin_service.settings(METHOD, values, seed=100, **FAST))
        assert numbers["strengths"] == values and numbers["read_as"] == twin.grid.predictions.tolist()
        for item, twin_tile in zip(gallery, twin.grid.tiles(), strict=True):
            assert tile_pixels(item["image"]).tobytes() == tile_pixels(twin_tile).tobytes()


# ---------------------------------------------------------------------------------------- shipped artefacts
@pytest.mark.slow
def test_shipped_deltas_lower_the_rate_of_nine():
    deltas_folder = PRETRAINED / "deltas"
    if not (DEFAULT_PIPELINE / "model_index.json").is_file() or not deltas_folder.is_dir():
        pytest.skip(f"needs the shipped pipeline ({DEFAULT_PIPELINE}) and deltas ({deltas_folder})")
    service = EraserService.from_pretrained(DEFAULT_PIPELINE, deltas_folder)
    assert service.methods, f"no method folder with deltas in {deltas_folder}"
    for method in service.methods:
        settings = service.settings(method, strengths(d9=1.0), samples_per_digit=4)
        result = service.generate(settings)
        base_rates, rates = result.base_grid.digit_rates(), result.grid.digit_rates()
        assert base_rates[9] >= 0.75, f"the base model should draw 9s ({base_rates})"
        assert rates[9] <= base_rates[9] - 0.5, f"{method}: 9 rate {rates[9]:.2f} vs base {base_rates[9]:.2f}"
