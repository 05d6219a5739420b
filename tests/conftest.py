"""Shared fixtures: tiny components, offline Hub, CPU only."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
import torch  # noqa: E402

from d3pm_hub import D3PMPipeline, D3PMScheduler, D3PMUNet  # noqa: E402

# Tiny models run fastest on one thread, and multi-threaded small ops slow to a crawl on a busy 2-core machine.
torch.set_num_threads(1)

TINY_UNET = dict(
    block_out_channels=(16, 16, 16),
    state_embedding_dim=8,
    cross_attention_dim=16,
    attention_head_dim=8,
    norm_num_groups=8,
)


def tiny_pipeline(num_levels: int = 8, transition_type: str = "uniform", seed: int = 0) -> D3PMPipeline:
    """A randomly initialised pipeline small enough for unit tests (T = 50, K = num_levels)."""
    torch.manual_seed(seed)
    scheduler = D3PMScheduler(num_train_timesteps=50, num_classes=num_levels, transition_type=transition_type)
    unet = D3PMUNet(num_levels=num_levels, num_states=scheduler.num_states, **TINY_UNET)
    return D3PMPipeline(unet=unet, scheduler=scheduler)


@pytest.fixture
def pipeline() -> D3PMPipeline:
    return tiny_pipeline()
