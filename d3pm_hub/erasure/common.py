"""Shared pieces of the erasure methods: parameter sets, noisy batches, frozen targets, the optimisation loop.

Every gradient method erases on the D3PM's x0 logits z(x_t, t, label) ``(B, K, H, W)`` at t ~ U{1..T} with
x_t ~ q(x_t | x0) and x0 real digits of the embedded MNIST training split. It optimises a copy θ of the
chosen parameters (prepared with Accelerate, so ``accelerate launch`` scales it) and returns the increment
Δ = θ − θ₀, which becomes a `~d3pm_hub.deltas.ConceptDelta`.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from accelerate import Accelerator, DistributedDataParallelKwargs
from diffusers.optimization import get_scheduler

from ..data import dataset_to_tensors, load_mnist
from ..pipeline import D3PMPipeline
from ..scheduler import D3PMScheduler
from ..unet import D3PMUNet

logger = logging.getLogger(__name__)

LABEL_PATH = ("label_embedding.", "shared_context_tokens")
PARAMETER_SETS = ("x", "u", "full", "context", "all")


def is_cross_attention(name: str) -> bool:
    """Parameters of a cross-attention layer (``…attn2.to_q/to_k/to_v/to_out``)."""
    return ".attn2." in name


def is_label_path(name: str) -> bool:
    """The label → context map (label embedding and shared tokens): the 'text encoder' of this model."""
    return name.startswith(LABEL_PATH)


def select_parameters(unet: D3PMUNet, parameter_set: str) -> list[str]:
    """Names of the parameters an erasure edits.

    * ``x``: cross-attention (``attn2``) only — the label path inside the UNet (ESD-x);
    * ``u``: every UNet parameter except cross-attention and the label embedding (the image path, ESD-u);
    * ``full``: every parameter except the label embedding / shared tokens (ESD on the whole network);
    * ``context``: ``attn2.to_k`` and ``attn2.to_v``, the layers fed by the label context (UCE, SepME);
    * ``all``: every parameter (naive fine-tuning).
    """
    if parameter_set not in PARAMETER_SETS:
        raise ValueError(f"Unknown parameter set {parameter_set!r}; choose one of {PARAMETER_SETS}.")
    chosen = {
        "x": lambda n: is_cross_attention(n),
        "u": lambda n: not is_cross_attention(n) and not is_label_path(n),
        "full": lambda n: not is_label_path(n),
        "context": lambda n: is_cross_attention(n) and (".to_k." in n or ".to_v." in n),
        "all": lambda n: True,
    }[parameter_set]
    return [name for name, _ in unet.named_parameters() if chosen(name)]


def check_digits(unet: D3PMUNet, digits: list[int]) -> list[int]:
    """Validate the digits to erase: a non-empty list of distinct real labels."""
    digits = [int(d) for d in digits]
    if not digits or len(set(digits)) != len(digits) or not all(0 <= d < unet.null_label for d in digits):
        raise ValueError(f"digits must be distinct labels in 0..{unet.null_label - 1}, got {digits}.")
    return digits


@functools.lru_cache(maxsize=4)
def training_digits(num_levels: int, source: str = "embedded") -> tuple[torch.Tensor, torch.Tensor]:
    """Real MNIST training digits at K levels: images ``(N, 1, 28, 28)`` int64, labels ``(N,)`` int64."""
    return dataset_to_tensors(load_mnist(source, "train"), num_levels)


@dataclass
class DigitSampler:
    """Draws real digits of chosen classes and noises them: x0, t ~ U{1..T}, x_t ~ q(x_t | x0).

    Attributes:
        images: ``(N, 1, H, W)`` int64 levels of the chosen digits; labels: ``(N,)`` their digits.
    """

    images: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def for_digits(cls, scheduler: D3PMScheduler, digits: list[int], source: str = "embedded") -> DigitSampler:
        images, labels = training_digits(scheduler.config.num_classes, source)
        keep = torch.isin(labels, torch.tensor(digits))
        if not keep.any():
            raise ValueError(f"No training images of digits {digits}.")
        return cls(images[keep], labels[keep])

    def draw(
        self, scheduler: D3PMScheduler, batch_size: int, generator: torch.Generator, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x0, x_t ``(B, 1, H, W)``, t ``(B,)`` and digit labels ``(B,)`` on ``device``."""
        index = torch.randint(0, len(self.images), (batch_size,), generator=generator)
        x0, labels = self.images[index].to(device), self.labels[index].to(device)
        timesteps = torch.randint(1, scheduler.config.num_train_timesteps + 1, (batch_size,), generator=generator)
        x_t = scheduler.add_noise(x0, timesteps.to(device), generator)
        return x0, x_t.to(device), timesteps.to(device), labels


def null_labels_like(unet: D3PMUNet, labels: torch.Tensor) -> torch.Tensor:
    return torch.full_like(labels, unet.null_label)


@torch.no_grad()
def negative_guidance_target(
    frozen: D3PMUNet, x_t: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor, alpha: float
) -> torch.Tensor:
    """ESD's target z* = z_∅ − α (z_cond − z_∅) from the frozen model, ``(B, K, H, W)`` (∅ the null label)."""
    null_labels = null_labels_like(frozen, labels)
    both = frozen(torch.cat([x_t, x_t]), torch.cat([timesteps, timesteps]), torch.cat([labels, null_labels]))
    cond, unconditional = both.chunk(2)
    return unconditional - alpha * (cond - unconditional)


NEGATIVE_GUIDANCE = ("sum", "mixture")


def guide_away(
    guided: torch.Tensor,
    unconditional: torch.Tensor,
    erased: torch.Tensor,
    scale: float,
    combine: str = "sum",
    weights: list[float] | None = None,
) -> torch.Tensor:
    """Negative guidance away from a set S of erased digits, on x0 log-probabilities ``(B, K, H, W)``.

        sum:      log p̃ − s Σ_{e∈S} wₑ (log p_e − log p_∅)
        mixture:  log p̃ − s (log (1/|S|) Σ_{e∈S} p_e − log p_∅)

    with log p̃ = ``guided``, log p_∅ = ``unconditional`` and ``erased`` ``(|S|, B, K, H, W)`` the log p_e. The two
    agree for one digit; for a set the sum pushes |S| times, the mixture erases "any of S" once. ``weights`` (one
    per digit of S, default 1; sum only) push harder from some digits than from others. Unnormalised.
    """
    if combine not in NEGATIVE_GUIDANCE:
        raise ValueError(f"Unknown negative guidance {combine!r}; choose one of {NEGATIVE_GUIDANCE}.")
    if weights is not None and (combine != "sum" or len(weights) != len(erased)):
        raise ValueError(f"weights need the sum and one weight per erased digit ({len(erased)}), got {weights}.")
    if combine == "mixture":
        mixture = torch.logsumexp(erased, dim=0) - math.log(len(erased))
        return guided - scale * (mixture - unconditional)
    directions = erased - unconditional
    if weights is not None:
        directions = directions * torch.tensor(weights, dtype=erased.dtype, device=erased.device).view(-1, 1, 1, 1, 1)
    return guided - scale * directions.sum(0)


def logit_divergence(logits: torch.Tensor, target_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean per-pixel mismatch of x0 logits ``(B, K, H, W)`` to target logits.

    * ``mse``: ‖z − z*‖² / K (ESD's loss, on raw logits);
    * ``kl``: KL(softmax(z*) ‖ softmax(z)) in nats — the discrete-native loss on x0 distributions.
    """
    if kind == "mse":
        return F.mse_loss(logits.float(), target_logits.float())
    if kind == "kl":
        target_log_probs = torch.log_softmax(target_logits.float(), dim=1)
        log_probs = torch.log_softmax(logits.float(), dim=1)
        return (target_log_probs.exp() * (target_log_probs - log_probs)).sum(1).mean()
    raise ValueError(f"Unknown loss {kind!r}; choose 'mse' or 'kl'.")


@dataclass
class EarlyStopping:
    """G-CiRs stopping rule: stop when the smoothed concept loss has not improved for ``patience`` steps.

    The concept loss L_c is smoothed with an exponential moving average (factor ``smoothing``); an
    improvement must lower the best smoothed value by at least ``min_relative_improvement`` of it.
    """

    patience: int = 50
    min_relative_improvement: float = 0.01
    smoothing: float = 0.9
    best: float = float("inf")
    smoothed: float | None = None
    since_best: int = 0

    def update(self, concept_loss: float) -> bool:
        """Record one step's concept loss; True when optimisation should stop."""
        self.smoothed = (
            concept_loss
            if self.smoothed is None
            else self.smoothing * self.smoothed + (1 - self.smoothing) * concept_loss
        )
        if self.smoothed < self.best * (1 - self.min_relative_improvement):
            self.best, self.since_best = self.smoothed, 0
        else:
            self.since_best += 1
        return self.since_best >= self.patience


@dataclass
class OptimisationResult:
    """Increments Δ_g = θ_g − θ₀ of the trained parameters (one dict per group), per-step losses and learning rate
    (``history``), steps, seconds."""

    increments: list[dict[str, torch.Tensor]]
    history: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0


class ConceptIncrements(torch.nn.Module):
    """Trainable increments Δ_g of chosen parameters, one set per group g, on top of a frozen UNet θ₀.

    ``forward(x_t, timesteps, labels, groups=None, offsets=None, **kwargs)`` runs the UNet with
    θ₀ + offsets + Σ_{g ∈ groups} Δ_g (every group when ``groups`` is None; ``offsets``: fixed increments by
    parameter name, e.g. deltas the trained ones build on), so increments can be trained to work alone and summed.
    """

    def __init__(self, unet: D3PMUNet, names: list[str], num_groups: int = 1):
        super().__init__()
        self.unet = unet.requires_grad_(False)
        self.names = list(names)
        self.increments = torch.nn.ModuleList(
            torch.nn.ParameterList(torch.zeros_like(unet.get_parameter(name)) for name in self.names)
            for _ in range(num_groups)
        )

    def forward(
        self,
        x_t,
        timesteps,
        labels,
        groups: list[int] | None = None,
        offsets: dict[str, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        groups = range(len(self.increments)) if groups is None else groups
        offsets = offsets or {}
        parameters = {
            name: self.unet.get_parameter(name) + offsets.get(name, 0) + sum(self.increments[g][i] for g in groups)
            for i, name in enumerate(self.names)
        }
        return torch.func.functional_call(self.unet, parameters, (x_t, timesteps, labels), kwargs)

    def named_increments(self) -> list[dict[str, torch.Tensor]]:
        """Δ_g per group as ``{parameter name: tensor}`` (detached, on the CPU)."""
        return [
            {name: delta.detach().cpu() for name, delta in zip(self.names, group, strict=True)}
            for group in self.increments
        ]


LossFunction = Callable[[ConceptIncrements, torch.Generator], dict[str, torch.Tensor]]


def optimise_increment(
    unet: D3PMUNet,
    names: list[str],
    loss_fn: LossFunction,
    steps: int,
    learning_rate: float,
    l2_penalty: float = 0.0,
    project: Callable[[int, str, torch.Tensor], torch.Tensor] | None = None,
    early_stopping: EarlyStopping | None = None,
    max_grad_norm: float = 1.0,
    num_groups: int = 1,
    seed: int = 0,
    lr_schedule: str = "constant",
) -> OptimisationResult:
    """Adam on increments Δ_g of ``names`` over a copy of ``unet`` (`ConceptIncrements`); returns every Δ_g.

    Minimises ``loss_fn(model, generator)["loss"] + l2_penalty · Σ_g ‖Δ_g‖²``; the loss calls
    ``model(x_t, t, labels)`` (all groups) or ``model(..., groups=[...])`` (a subset). After every step each
    increment may be replaced by ``project(group, name, Δ)`` (weight decoupling). With ``early_stopping`` the
    loop ends once ``loss_fn(...)["concept"]``, averaged over processes, stops improving. ``lr_schedule`` is a diffusers
    `~diffusers.optimization.get_scheduler` name over ``steps`` (``"cosine"`` anneals to 0, which lowers the
    final distillation error of long runs).

    The model and the optimiser go through ``accelerator.prepare`` (device placement, DDP under
    ``accelerate launch``); ``unet`` itself is never modified.
    """
    if steps < 1 or learning_rate <= 0:
        raise ValueError(f"steps and learning_rate must be positive, got {steps} and {learning_rate}.")
    # With several groups a step may train only some of them: DDP must allow unused parameters.
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if num_groups > 1 else []
    accelerator = Accelerator(kwargs_handlers=handlers)
    increments = ConceptIncrements(copy.deepcopy(unet).train(), names, num_groups)
    trainable = list(increments.increments.parameters())
    optimizer = torch.optim.Adam(trainable, lr=learning_rate)
    lr_scheduler = get_scheduler(
        lr_schedule, optimizer, num_warmup_steps=0, num_training_steps=steps * accelerator.num_processes
    )
    model, optimizer, lr_scheduler = accelerator.prepare(increments, optimizer, lr_scheduler)
    increments = accelerator.unwrap_model(model)
    generator = torch.Generator().manual_seed(seed + accelerator.process_index)
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    for step in range(steps):
        losses = loss_fn(model, generator)
        loss = losses["loss"]
        if l2_penalty:
            loss = loss + l2_penalty * sum((delta**2).sum() for delta in trainable)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(trainable, max_grad_norm)
        step_lr = lr_scheduler.get_last_lr()[0]
        optimizer.step()
        lr_scheduler.step()
        if project is not None:
            with torch.no_grad():
                for group, deltas in enumerate(increments.increments):
                    for name, delta in zip(increments.names, deltas, strict=True):
                        delta.copy_(project(group, name, delta))
        # Averaged over processes, so every process takes the same early-stopping decision (else one would stop
        # and leave the others waiting on its gradients).
        reduced = accelerator.reduce(torch.stack([value.detach().float() for value in losses.values()]), "mean")
        history.append(dict(zip(losses, reduced.tolist(), strict=True)) | {"lr": step_lr})
        if step % 50 == 0:
            logger.info("erase step %d: %s", step, {k: round(v, 5) for k, v in history[-1].items()})
        if early_stopping is not None and early_stopping.update(history[-1]["concept"]):
            logger.info("early stop at step %d (concept loss %.5f)", step + 1, early_stopping.smoothed)
            break
    return OptimisationResult(increments.named_increments(), history, len(history), time.perf_counter() - started)


def erasure_loss(
    frozen: D3PMUNet,
    scheduler: D3PMScheduler,
    digits: list[int],
    alpha: float,
    loss: str,
    batch_size: int,
    preserve_weight: float = 0.0,
) -> LossFunction:
    """The ESD family's loss: the edited model's conditional logits for the erased labels match z*.

    L = D(z_θ(x_t, t, e), z*) + w · D(z_θ(x_t', t', c), z_θ₀(x_t', t', c)),  z* = z_a − α (z_e − z_a)

    with D ``mse`` or ``kl`` (`logit_divergence`), e an erased digit and x_t from real images of e, a the
    null label, and the optional preservation term over images of the
    other digits c under their own label and the null label (weight w = ``preserve_weight``).
    Returns ``{"loss", "concept", "preserve"}``.
    """
    device = frozen.device
    erased = DigitSampler.for_digits(scheduler, digits)
    others = [d for d in range(frozen.null_label) if d not in digits]
    kept = DigitSampler.for_digits(scheduler, others) if preserve_weight and others else None

    def loss_fn(model: D3PMUNet, generator: torch.Generator) -> dict[str, torch.Tensor]:
        _, x_t, timesteps, labels = erased.draw(scheduler, batch_size, generator, device)
        target = negative_guidance_target(frozen, x_t, timesteps, labels, alpha)
        concept = logit_divergence(model(x_t, timesteps, labels), target, loss)
        preserve = torch.zeros((), device=device)
        if kept is not None:
            _, x_t, timesteps, labels = kept.draw(scheduler, batch_size, generator, device)
            labels = torch.cat([labels, null_labels_like(frozen, labels)])
            x_t, timesteps = torch.cat([x_t, x_t]), torch.cat([timesteps, timesteps])
            with torch.no_grad():
                reference = frozen(x_t, timesteps, labels)
            preserve = logit_divergence(model(x_t, timesteps, labels), reference, loss)
        return {"loss": concept + preserve_weight * preserve, "concept": concept, "preserve": preserve}

    return loss_fn


def frozen_copy(pipeline: D3PMPipeline) -> D3PMUNet:
    """The pipeline's UNet in eval mode with gradients off (used only for targets; not modified)."""
    frozen = copy.deepcopy(pipeline.unet).eval()
    frozen.requires_grad_(False)
    return frozen


def context_tokens(unet: D3PMUNet, labels: list[int]) -> torch.Tensor:
    """The distinct context tokens ``(n, D)`` (float64) that labels feed to every ``attn2.to_k/to_v``.

    Per-label tokens of each label followed by the shared tokens once.
    """
    with torch.no_grad():
        per_label = unet.label_embedding.weight[labels].reshape(-1, unet.config.cross_attention_dim)
        return torch.cat([per_label, unet.shared_context_tokens]).double()


def low_rank_factors(increment: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``up`` ``(out, r)`` and ``down`` ``(r, in·k·k)`` with ``up @ down`` the best rank-r approximation of the
    increment's matrix ``(out, in·k·k)`` (a vector's is ``(out, 1)``), r = min(rank, out, in·k·k)."""
    matrix = increment.double().reshape(increment.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]).float(), vh[:rank].float()
