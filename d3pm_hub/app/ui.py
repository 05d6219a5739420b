"""The Gradio interface over :class:`~d3pm_hub.app.service.EraserService`: controls, gallery, rate chart, API."""

from __future__ import annotations

import hashlib
import io
import tempfile
from collections.abc import Callable
from pathlib import Path

import gradio as gr
import pandas as pd
from PIL import Image

from ..paths import atomic_write
from .service import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_NUM_INFERENCE_STEPS,
    DEFAULT_SAMPLES_PER_DIGIT,
    DEFAULT_SEED,
    MAX_GUIDANCE_SCALE,
    MAX_SAMPLES_PER_DIGIT,
    MAX_SEED,
    NUM_DIGITS,
    EraserService,
    GridResult,
)

API_NAME = "generate"
SAMPLER_QUEUE = "sampler"  # every event that samples shares one queue, limited to the service's replicas
THEME = gr.themes.Soft()
TILE_FOLDER = Path(tempfile.gettempdir()) / "d3pm-hub-tiles"

INTRO = """
# Erase digits from a diffusion model — live
A class-conditional discrete diffusion model (D3PM) draws every digit below. Each slider adds that digit's
*erasure delta* (a small weight increment) to the model: 0 = intact, 1 = erased. Deltas compose, so several digits
can be erased at once and restored by moving their slider back. With the default method (`separable`) an erased
digit's row shows clean digits of another class (its *anchor*, never a digit that is erased), and unconditional
samples stop drawing it too. The chart shows how often an independent classifier reads each digit's samples as that
digit, for the base model and for the current mix.
"""

API_HELP = f"""
**API** — every grid is also an endpoint: `Client(url).predict(strength_9=1.0, api_name="/{API_NAME}")`
with `gradio_client`; see *Use via API* below for all parameters.
"""

LEGEND = """
*Captions*: digit (erasure strength) → what the classifier reads. *Chart*: the share of each digit's samples that
the classifier reads as that digit — grey for the base model, orange for the current mix.
"""

GenerateOutputs = tuple[list[tuple[str, str]], pd.DataFrame, dict, str]


def rates_frame(result: GridResult) -> pd.DataFrame:
    """One row per (digit, model): ``bar`` ("9 base"), ``model`` (base/now) and ``rate`` in [0, 1]."""
    rows = []
    for digit, (base, now) in enumerate(zip(result.base_grid.digit_rates(), result.grid.digit_rates(), strict=True)):
        rows.append({"bar": f"{digit} base", "model": "base", "rate": base})
        rows.append({"bar": f"{digit} now", "model": "now", "rate": now})
    return pd.DataFrame(rows)


def tile_file(tile: Image.Image) -> str:
    """The tile as a PNG file named by its content, written atomically (temp file + rename); returns its path.

    Gradio 6.31 stores PIL outputs by truncating and rewriting a file named by the image's hash, so two requests
    returning the same image at once (an untouched digit, same seed) can serve a half-written copy. Given a finished
    file, Gradio takes its atomic copy path instead.
    """
    buffer = io.BytesIO()
    tile.save(buffer, format="png")
    data = buffer.getvalue()
    path = TILE_FOLDER / f"{hashlib.sha256(data).hexdigest()}.png"
    if not path.exists():
        atomic_write(path, lambda temporary: Path(temporary).write_bytes(data))
    return str(path)


def gallery_items(result: GridResult) -> list[tuple[str, str]]:
    """A captioned tile per digit (PNG paths): its samples, the strength applied and what the classifier reads."""
    items = []
    for digit, tile in enumerate(result.grid.tiles()):
        strength = result.settings.strengths[digit]
        readings = " ".join(str(p) for p in result.grid.predictions[digit].tolist())
        erased = f" ({strength:.0%})" if strength else ""
        items.append((tile_file(tile), f"{digit}{erased} → {readings}"))
    return items


def status_line(result: GridResult) -> str:
    """A one-line summary: what is erased, with which method, and the time taken."""
    erased = [f"{d} ({s:.0%})" for d, s in enumerate(result.settings.strengths) if s]
    what = f"erasing {', '.join(erased)} with **{result.settings.method}**" if erased else "base model (nothing erased)"
    return f"{what} · {result.seconds:.2f} s"


def make_generate_handler(service: EraserService) -> Callable[..., GenerateOutputs]:
    """The ``/generate`` handler; its parameter names are the API's parameter names."""

    def generate(
        method: str | None,
        strength_0: float,
        strength_1: float,
        strength_2: float,
        strength_3: float,
        strength_4: float,
        strength_5: float,
        strength_6: float,
        strength_7: float,
        strength_8: float,
        strength_9: float,
        guidance_scale: float,
        num_inference_steps: int,
        seed: int,
        samples_per_digit: int,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 (Gradio's documented way to request a progress bar)
    ) -> GenerateOutputs:
        """Sample every digit with the given erasure strengths and sampler settings.

        Args:
            method: erasure method whose deltas are applied (one of the app's methods; ignored when nothing is erased).
            strength_0: erasure strength of digit 0, 0 (intact) … 1 (erased); likewise strength_1 … strength_9.
            guidance_scale: classifier-free guidance scale, 0 … 10.
            num_inference_steps: sampling steps, 1 … 100 (capped at the model's number of timesteps).
            seed: random seed, 0 … 2³² − 1; the same seed gives the same starting noise for every setting.
            samples_per_digit: images per digit, 1 … 8.

        Returns:
            The gallery (a captioned tile per digit), the rate chart's data, the numbers as JSON (``strengths``,
            ``digit_rate_base``, ``digit_rate_now``, ``read_as``, ``seconds`` …) and a status line.
        """
        strengths = [
            strength_0,
            strength_1,
            strength_2,
            strength_3,
            strength_4,
            strength_5,
            strength_6,
            strength_7,
            strength_8,
            strength_9,
        ]
        try:
            settings = service.settings(method, strengths, guidance_scale, num_inference_steps, seed, samples_per_digit)
        except ValueError as error:
            raise gr.Error(str(error), title="Invalid settings", print_exception=False) from None
        result = service.generate(settings, lambda fraction, description: progress(fraction, desc=description))
        return gallery_items(result), rates_frame(result), result.summary(), status_line(result)

    return generate


def build_demo(service: EraserService) -> gr.Blocks:
    """The app: a slider per digit, a method selector, sampler settings, the gallery and the rate chart.

    The queue admits ``service.max_concurrent_requests`` sampling requests at once. Launch with :func:`launch`.
    """
    methods = service.methods
    has_deltas = bool(methods)
    with gr.Blocks(title="d3pm-hub · erase digits") as demo:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                method = gr.Dropdown(
                    choices=methods,
                    value=methods[0] if has_deltas else None,
                    label="Erasure method",
                    info="Whose deltas the sliders apply" if has_deltas else "No deltas installed",
                    interactive=has_deltas,
                )
                gr.Markdown("**Erasure strength per digit** (0 = intact, 1 = erased)")
                sliders: list[gr.Slider] = []
                with gr.Row():
                    for first_digit in (0, NUM_DIGITS // 2):
                        with gr.Column(min_width=140):
                            for digit in range(first_digit, first_digit + NUM_DIGITS // 2):
                                sliders.append(
                                    gr.Slider(
                                        0,
                                        1,
                                        value=0,
                                        step=0.05,
                                        label=str(digit),
                                        elem_id=f"strength-{digit}",
                                        interactive=has_deltas,
                                    )
                                )
                with gr.Row():
                    erase_all = gr.Button("Erase all", size="sm", interactive=has_deltas, elem_id="erase-all")
                    restore_all = gr.Button("Restore all", size="sm", interactive=has_deltas, elem_id="restore-all")
                with gr.Accordion("Sampler", open=False):
                    guidance_scale = gr.Slider(
                        0, MAX_GUIDANCE_SCALE, value=DEFAULT_GUIDANCE_SCALE, step=0.5, label="Guidance scale"
                    )
                    num_inference_steps = gr.Slider(
                        1,
                        service.max_num_inference_steps,
                        value=DEFAULT_NUM_INFERENCE_STEPS,
                        step=1,
                        label="Sampling steps",
                        info="More steps: cleaner digits, slower",
                    )
                    seed = gr.Number(value=DEFAULT_SEED, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
                    samples_per_digit = gr.Slider(
                        1, MAX_SAMPLES_PER_DIGIT, value=DEFAULT_SAMPLES_PER_DIGIT, step=1, label="Samples per digit"
                    )
                generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                gallery = gr.Gallery(
                    label="Samples",
                    columns=5,
                    height=340,
                    object_fit="contain",
                    allow_preview=False,
                    elem_id="grid",
                )
                status = gr.Markdown(label="Status", elem_id="status")
                gr.Markdown(LEGEND)
                chart = gr.BarPlot(
                    x="bar",
                    y="rate",
                    color="model",
                    color_map={"base": "#9ca3af", "now": "#f97316"},
                    colors_in_legend=[],  # the bars are labelled "d base" / "d now" already
                    sort=[f"{d} {model}" for d in range(NUM_DIGITS) for model in ("base", "now")],
                    y_lim=[0, 1],
                    x_title="digit",
                    y_title="read as its own digit",
                    x_label_angle=-45,
                    label="Rates",
                    height=300,
                )
                with gr.Accordion("Numbers (as returned by the API)", open=False):
                    numbers = gr.JSON(label="Numbers")
                gr.Markdown(API_HELP)

        inputs = [method, *sliders, guidance_scale, num_inference_steps, seed, samples_per_digit]
        outputs = [gallery, chart, numbers, status]
        generate = make_generate_handler(service)
        sampling = dict(fn=generate, inputs=inputs, outputs=outputs, concurrency_id=SAMPLER_QUEUE)
        generate_button.click(**sampling, api_name=API_NAME)
        gr.on(
            [demo.load, method.change, *(slider.release for slider in sliders)],
            **sampling,
            api_visibility="private",
            trigger_mode="always_last",
        )
        for button, strength in ((erase_all, 1.0), (restore_all, 0.0)):
            button.click(
                lambda value=strength: [value] * NUM_DIGITS, outputs=sliders, queue=False, api_visibility="private"
            ).then(**sampling, api_visibility="private")
    demo.queue(default_concurrency_limit=service.max_concurrent_requests, max_size=64)
    return demo


def launch(demo: gr.Blocks, **kwargs) -> tuple:
    """``demo.launch`` with the app's theme (Gradio 6 takes the theme at launch); kwargs go to ``launch``."""
    return demo.launch(theme=THEME, **kwargs)
