"""d3pm-hub: a diffusers-style class-conditional D3PM on MNIST with composable concept-erasure deltas."""

from .pipeline import D3PMPipeline
from .scheduler import D3PMScheduler, D3PMSchedulerOutput
from .unet import D3PMUNet

__all__ = ["D3PMPipeline", "D3PMScheduler", "D3PMSchedulerOutput", "D3PMUNet"]
