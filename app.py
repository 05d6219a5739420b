"""Serve the d3pm-hub app: ``python app.py`` (also the Hugging Face Space's entry point).

The model is the shipped ``pretrained/d3pm-mnist`` unless ``--model`` or ``D3PM_HUB_MODEL`` names another folder
or a Hub repo id; deltas come from ``pretrained/deltas/{method}/digit-{d}.safetensors`` (``--deltas`` /
``D3PM_HUB_DELTAS``). Host and port follow Gradio's ``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT`` unless given.
"""

from __future__ import annotations

import argparse
import os

import torch

from d3pm_hub.app import DEFAULT_DELTAS_FOLDER, EraserService, build_demo, launch
from d3pm_hub.app.service import DEFAULT_MAX_CONCURRENT_REQUESTS
from d3pm_hub.paths import DEFAULT_PIPELINE


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default=os.environ.get("D3PM_HUB_MODEL", str(DEFAULT_PIPELINE)),
        help="pipeline folder or Hub repo id (default: D3PM_HUB_MODEL or the shipped pretrained/d3pm-mnist)",
    )
    parser.add_argument(
        "--deltas",
        default=os.environ.get("D3PM_HUB_DELTAS", str(DEFAULT_DELTAS_FOLDER)),
        help="folder of {method}/digit-{d}.safetensors made for this model (default: D3PM_HUB_DELTAS or the shipped)",
    )
    parser.add_argument("--host", default=None, help="default: GRADIO_SERVER_NAME or 127.0.0.1")
    parser.add_argument("--port", type=int, default=None, help="default: GRADIO_SERVER_PORT or 7860")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULT_MAX_CONCURRENT_REQUESTS,
        help="requests sampled at once (each on its own UNet replica, one torch thread each)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Requests run in parallel threads; one torch thread each keeps small batches from oversubscribing the CPU.
    torch.set_num_threads(1)
    service = EraserService.from_pretrained(args.model, args.deltas, max_concurrent_requests=args.concurrency)
    service.warm_up()
    launch(build_demo(service), server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
