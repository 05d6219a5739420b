"""D3PMUNet: x_t (integer grey levels) + t + a label context → logits of x0.

The network is diffusers' `UNet2DConditionModel` (ResNet blocks, sinusoidal timestep embedding,
transformer blocks whose ``attn2`` cross-attends to a context), wrapped with

* a state embedding: each of the S discrete states of x_t becomes a learned vector (a 1×1 conv on one-hot x_t);
* a label context of ``num_label_tokens`` per-label tokens followed by ``num_shared_tokens`` learned tokens
  shared by every label. With one token the attention softmax is 1 and ``to_k`` would be inert; several
  tokens let keys decide where each query looks, which is what erasure methods edit.

Label ``num_labels`` (10 for MNIST) is the null label used for classifier-free guidance.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange, repeat
from torch import nn


class D3PMUNet(ModelMixin, ConfigMixin):
    """Predicts p̃(x0 | x_t, label) as logits ``(B, num_levels, H, W)``.

    Args:
        num_levels: K, grey levels of x0 (the output classes).
        num_states: S, states of x_t (K, or K + 1 with the absorbing mask state); defaults to K.
        num_labels: number of real labels; index ``num_labels`` is the null label.
        sample_size: image side (28 for MNIST).
        state_embedding_dim: channels of the embedded x_t fed to the UNet.
        block_out_channels: channels per resolution; cross-attention sits at every resolution but the first.
        layers_per_block: ResNet (+ attention) layers per resolution.
        attention_head_dim: channels per attention head.
        cross_attention_dim: D, the width of a context token.
        num_label_tokens: per-label context tokens.
        num_shared_tokens: learned context tokens shared by all labels.
        norm_num_groups: GroupNorm groups.
    """

    @register_to_config
    def __init__(
        self,
        num_levels: int = 32,
        num_states: int | None = None,
        num_labels: int = 10,
        sample_size: int = 28,
        state_embedding_dim: int = 32,
        block_out_channels: tuple[int, ...] = (32, 64, 64),
        layers_per_block: int = 1,
        attention_head_dim: int = 8,
        cross_attention_dim: int = 64,
        num_label_tokens: int = 2,
        num_shared_tokens: int = 2,
        norm_num_groups: int = 8,
    ):
        super().__init__()
        num_states = num_states or num_levels
        self.num_states = num_states
        self.null_label = num_labels
        self.state_embedding = nn.Embedding(num_states, state_embedding_dim)
        self.label_embedding = nn.Embedding(num_labels + 1, num_label_tokens * cross_attention_dim)
        self.shared_context_tokens = nn.Parameter(0.02 * torch.randn(num_shared_tokens, cross_attention_dim))
        depth = len(block_out_channels)
        self.unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=state_embedding_dim,
            out_channels=num_levels,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (depth - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (depth - 1) + ("UpBlock2D",),
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
        )

    def label_context(self, class_labels: torch.LongTensor) -> torch.Tensor:
        """Context tokens ``(B, num_label_tokens + num_shared_tokens, D)`` for labels ``(B,)`` in 0..num_labels."""
        self._check_labels(class_labels)
        per_label = rearrange(self.label_embedding(class_labels), "b (n d) -> b n d", n=self.config.num_label_tokens)
        shared = repeat(self.shared_context_tokens, "n d -> b n d", b=len(class_labels))
        return torch.cat([per_label, shared], dim=1)

    def forward(
        self,
        sample: torch.LongTensor,
        timestep: torch.Tensor | int,
        class_labels: torch.LongTensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x0 logits ``(B, K, H, W)``.

        Args:
            sample: x_t, ``(B, 1, H, W)`` int64 states in 0..S-1.
            timestep: t in 1..T, a scalar or ``(B,)``.
            class_labels: ``(B,)`` int64 in 0..num_labels (num_labels = null). Ignored when
                ``encoder_hidden_states`` is given.
            encoder_hidden_states: an explicit context ``(B, N, D)`` (e.g. an optimised label embedding).
        """
        if sample.dtype != torch.long or sample.dim() != 4 or sample.shape[1] != 1:
            raise ValueError(
                f"sample must be int64 states of shape (B, 1, H, W), got {sample.dtype} {tuple(sample.shape)}."
            )
        if sample.numel() and (sample.min() < 0 or sample.max() >= self.num_states):
            raise ValueError(f"sample states must lie in 0..{self.num_states - 1}.")
        if encoder_hidden_states is None:
            if class_labels is None:
                raise ValueError("Pass class_labels (B,) or encoder_hidden_states (B, N, D).")
            encoder_hidden_states = self.label_context(class_labels.to(sample.device))
        hidden = rearrange(self.state_embedding(sample[:, 0]), "b h w c -> b c h w")
        timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(len(sample))
        return self.unet(hidden, timestep, encoder_hidden_states.to(hidden.dtype)).sample

    def _check_labels(self, class_labels: torch.Tensor) -> None:
        if class_labels.dtype != torch.long or class_labels.dim() != 1:
            raise ValueError(f"class_labels must be an int64 tensor of shape (B,), got {class_labels.dtype}.")
        if class_labels.numel() and (class_labels.min() < 0 or class_labels.max() > self.null_label):
            raise ValueError(
                f"class_labels must lie in 0..{self.null_label} ({self.null_label} = null/unconditional), "
                f"got {class_labels.tolist()}."
            )
