"""D3PMScheduler: the discrete forward process, its posteriors, the hybrid loss and a strided sampler.

Austin et al. 2021, "Structured Denoising Diffusion Models in Discrete State-Spaces". Notation (row vectors):

* one-step transition   q(x_t | x_{t-1}) = Cat(x_{t-1} Q_t),        Q_t[i, j] = q(x_t = j | x_{t-1} = i)
* marginal              q(x_t | x_0)     = Cat(x_0 Q̄_t),            Q̄_t = Q_1 Q_2 … Q_t,  Q̄_0 = I
* multi-step            q(x_t | x_s)     = Cat(x_s Q_{t|s}),        Q_{t|s} = Q_{s+1} … Q_t   (s < t)
* posterior             q(x_s | x_t, x_0) ∝ Q_{t|s}[x_s, x_t] · Q̄_s[x_0, x_s]
* model (x0-parameterisation, eq. 4 of the paper)
                        p_θ(x_s | x_t) ∝ Q_{t|s}[x_s, x_t] · Σ_{x0} p̃_θ(x0 | x_t) Q̄_s[x0, x_s]

Timesteps are the paper's t = 1 … T; t = 0 is the data. All transition maths is float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

TRANSITION_TYPES = ("uniform", "absorbing", "gaussian")
DEFAULT_BETA_SCHEDULES = {"uniform": "cosine", "absorbing": "jsd", "gaussian": "linear"}
LOG_EPS = 1e-40


@dataclass
class D3PMSchedulerOutput(BaseOutput):
    """Output of `D3PMScheduler.step`.

    Args:
        prev_sample: ``(B, 1, H, W)`` int64, x_s sampled from p_θ(x_s | x_t).
        pred_original_sample: ``(B, 1, H, W)`` int64, the argmax of the model's x0 distribution.
    """

    prev_sample: torch.LongTensor
    pred_original_sample: torch.LongTensor


def gumbel_max_sample(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.LongTensor:
    """Sample Cat(softmax(logits)) along the last dim by argmax(logits + Gumbel noise), in float64.

    The noise is drawn on the generator's device (so a CPU generator reproduces across devices).
    """
    noise_device = generator.device if generator is not None else logits.device
    uniform = torch.rand(logits.shape, generator=generator, dtype=torch.float64, device=noise_device)
    uniform = uniform.to(logits.device)
    gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-30, max=1 - 1e-16)))
    return torch.argmax(logits.double() + gumbel, dim=-1)


class D3PMScheduler(SchedulerMixin, ConfigMixin):
    """Discrete denoising diffusion over ``num_classes`` ordinal states (grey levels).

    Args:
        num_train_timesteps: T, the number of forward steps.
        num_classes: K, the number of grey levels of the data. The absorbing process adds a mask state,
            so it has ``K + 1`` states (`num_states`); the data and the model's x0 prediction use K.
        transition_type: ``"uniform"`` (Q_t = (1-β_t) I + β_t 11ᵀ/K), ``"absorbing"`` (each state moves to
            the mask state with probability β_t) or ``"gaussian"`` (discretised Gaussian: nearby grey levels
            are likelier; D3PM's best on images).
        beta_schedule: ``"cosine"``, ``"jsd"`` (β_t = 1/(T-t+1)) or ``"linear"``; ``None`` picks the paper's
            choice for the transition type (cosine, jsd, linear respectively).
        beta_start: first β of the linear schedule.
        beta_end: last β of the linear schedule.
        hybrid_loss_coeff: λ in L = L_vb + λ·CE(x0) (Austin et al. use 0.001).
    """

    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        num_classes: int = 32,
        transition_type: str = "uniform",
        beta_schedule: str | None = None,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        hybrid_loss_coeff: float = 0.001,
    ):
        if transition_type not in TRANSITION_TYPES:
            raise ValueError(f"Unknown transition_type {transition_type!r}; choose one of {TRANSITION_TYPES}.")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}.")
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be positive, got {num_train_timesteps}.")
        self.betas = self._make_betas(beta_schedule or DEFAULT_BETA_SCHEDULES[transition_type])
        self.num_states = num_classes + (transition_type == "absorbing")
        self.mask_state = num_classes if transition_type == "absorbing" else None
        # q_onestep[t] = Q_t and q_cumulative[t] = Q̄_t for t = 0..T (index 0 is the identity). The products
        # run in numpy: a thousand 32×32 products take milliseconds there, but seconds in multi-threaded torch.
        onestep = np.stack([np.eye(self.num_states)] + [self._onestep_matrix(beta) for beta in self.betas[1:]])
        cumulative = np.empty_like(onestep)
        cumulative[0] = onestep[0]
        for t in range(1, num_train_timesteps + 1):
            cumulative[t] = cumulative[t - 1] @ onestep[t]
        self.q_onestep = torch.from_numpy(onestep)
        self.q_cumulative = torch.from_numpy(cumulative)
        self._device_cache: dict[tuple[str, str], torch.Tensor] = {}
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(num_train_timesteps, 0, -1)
        self.previous_timesteps: dict[int, int] = {}
        self.strided_matrices: dict[int, torch.Tensor] = {}

    # ----------------------------------------------------------------------------------------- schedule
    def _make_betas(self, schedule: str) -> torch.Tensor:
        """β_0 … β_T as float64 (β_0 = 0 is a placeholder: there is no step into t = 0)."""
        T = self.config.num_train_timesteps
        t = torch.arange(1, T + 1, dtype=torch.float64)
        if schedule == "cosine":
            # Hoogeboom et al.: ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2), β_t = 1 - ᾱ(t)/ᾱ(t-1).
            s = 0.008
            alpha_bar = torch.cos((torch.arange(0, T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2)
            alpha_bar = alpha_bar**2
            betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
        elif schedule == "jsd":
            betas = 1.0 / (T - t + 1)
        elif schedule == "linear":
            betas = torch.linspace(self.config.beta_start, self.config.beta_end, T, dtype=torch.float64)
        else:
            raise ValueError(f"Unknown beta_schedule {schedule!r}; choose cosine, jsd or linear.")
        return torch.cat([torch.zeros(1, dtype=torch.float64), betas])

    def _onestep_matrix(self, beta: torch.Tensor) -> np.ndarray:
        """Q_t (S, S) float64, rows sum to 1: Q_t[i, j] = q(x_t = j | x_{t-1} = i)."""
        S, K = self.num_states, self.config.num_classes
        beta = float(beta)
        kind = self.config.transition_type
        if kind == "uniform":
            return (1 - beta) * np.eye(S) + beta / S
        if kind == "absorbing":
            matrix = (1 - beta) * np.eye(S)
            matrix[:, self.mask_state] += beta
            return matrix
        # Discretised Gaussian (Austin et al. App. A.2.2): off-diagonal ∝ exp(-4 (i-j)² / ((K-1)² β)),
        # normalised over all offsets -(K-1)..K-1; the diagonal takes the remaining mass.
        offsets = np.arange(-(K - 1), K, dtype=np.float64)
        weights = np.exp(-4 * offsets**2 / ((K - 1) ** 2 * beta))
        weights = weights / weights.sum()
        index = np.arange(K)
        matrix = weights[(index[None, :] - index[:, None]) + K - 1]
        np.fill_diagonal(matrix, 0)
        return matrix + np.diag(1 - matrix.sum(axis=1))

    def stationary_distribution(self) -> torch.Tensor:
        """(S,) the distribution q(x_T) approaches: uniform for uniform/gaussian, all mass on mask for absorbing."""
        if self.mask_state is not None:
            return F.one_hot(torch.tensor(self.mask_state), self.num_states).double()
        return torch.full((self.num_states,), 1.0 / self.num_states, dtype=torch.float64)

    def multistep_matrix(self, t: int, s: int) -> torch.Tensor:
        """Q_{t|s} = Q_{s+1} … Q_t (S, S) for 0 ≤ s ≤ t ≤ T: q(x_t | x_s)."""
        if not 0 <= s <= t <= self.config.num_train_timesteps:
            raise ValueError(f"Need 0 <= s <= t <= T, got s={s}, t={t}.")
        matrix = np.eye(self.num_states)
        for step in range(s + 1, t + 1):
            matrix = matrix @ self.q_onestep[step].numpy()
        return torch.from_numpy(matrix)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Choose ``num_inference_steps`` timesteps T = t_0 > t_1 > … > 1 and precompute Q_{t_i | t_{i+1}}.

        Skipping steps is exact: p(x_s | x_t) uses the true multi-step transition Q_{t|s}, so fewer steps
        change the resolution of the reverse process, not the process.
        """
        T = self.config.num_train_timesteps
        if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= T:
            raise ValueError(
                f"num_inference_steps must be an integer in 1..{T} (num_train_timesteps), got {num_inference_steps!r}."
            )
        self.num_inference_steps = num_inference_steps
        steps = torch.linspace(T, 1, num_inference_steps, dtype=torch.float64).round().long()
        self.timesteps = steps.to(device) if device is not None else steps
        previous = torch.cat([steps[1:], torch.zeros(1, dtype=torch.long)]).tolist()
        self.previous_timesteps = dict(zip(steps.tolist(), previous, strict=True))
        self.strided_matrices = {t: self.multistep_matrix(t, s) for t, s in self.previous_timesteps.items()}

    # ---------------------------------------------------------------------------------------- forward
    def q_probs(self, x0: torch.LongTensor, timesteps: torch.LongTensor) -> torch.Tensor:
        """q(x_t | x_0) = x_0 Q̄_t: ``(B, H, W, S)`` float64 for x0 ``(B, 1, H, W)`` and timesteps ``(B,)``."""
        timesteps = timesteps.long()
        if bool(((timesteps < 0) | (timesteps > len(self))).any()):
            raise ValueError(f"timesteps must lie in 0..{len(self)} (num_train_timesteps), got {timesteps.tolist()}.")
        q_bar = self._on(x0.device, "q_cumulative")[timesteps]  # (B, S, S)
        rows = x0[:, 0].long()  # (B, H, W)
        return q_bar[torch.arange(len(rows), device=x0.device)[:, None, None], rows]

    def add_noise(
        self,
        original_samples: torch.LongTensor,
        timesteps: torch.LongTensor,
        generator: torch.Generator | None = None,
    ) -> torch.LongTensor:
        """Sample x_t ~ q(x_t | x_0) for x0 ``(B, 1, H, W)`` int64 levels and timesteps ``(B,)`` in 1..T."""
        self._check_levels(original_samples, "original_samples", self.config.num_classes)
        log_probs = torch.log(self.q_probs(original_samples, timesteps).clamp(min=LOG_EPS))
        return gumbel_max_sample(log_probs, generator)[:, None]

    # -------------------------------------------------------------------------------------- posterior
    def _posterior_log_probs(
        self, x0_probs: torch.Tensor, x_t: torch.LongTensor, t: torch.LongTensor, s: torch.LongTensor
    ) -> torch.Tensor:
        """Normalised log p(x_s | x_t) ∝ log Q_{t|s}[x_s, x_t] + log (p(x0) Q̄_s)[x_s].

        Args:
            x0_probs: ``(B, H, W, S)`` float64 distribution over x0 (zero on the mask state).
            x_t: ``(B, 1, H, W)`` int64.
            t, s: ``(B,)`` int64 with s < t.
        Returns: ``(B, H, W, S)`` float64 log-probabilities of x_s.
        """
        if not bool(((s >= 0) & (s < t) & (t <= len(self))).all()):  # one device sync
            raise ValueError(
                f"Posteriors need timesteps 0 <= s < t <= {len(self)} (num_train_timesteps); got t={t.tolist()}, "
                f"s={s.tolist()}. Training timesteps t are drawn from 1..T."
            )
        device = x_t.device
        batch = torch.arange(len(t), device=device)[:, None, None]
        # Q_{t|s}[:, x_t] for each pixel: from x_s's point of view, the likelihood of reaching x_t.
        fact_from_xt = self._transitions(t, s, device).transpose(1, 2)[batch, x_t[:, 0]]  # (B, H, W, S)
        fact_from_x0 = torch.einsum("bhwk,bks->bhws", x0_probs, self._on(device, "q_cumulative")[s])
        logits = torch.log(fact_from_xt.clamp(min=LOG_EPS)) + torch.log(fact_from_x0.clamp(min=LOG_EPS))
        return torch.log_softmax(logits, dim=-1)

    def _transitions(self, t: torch.LongTensor, s: torch.LongTensor, device: torch.device) -> torch.Tensor:
        """Q_{t|s} for each batch element, ``(B, S, S)``; one-step pairs are a single gather."""
        if bool((s == t - 1).all()):
            return self._on(device, "q_onestep")[t]
        matrices = []
        for ti, si in zip(t.tolist(), s.tolist(), strict=True):
            strided = self.previous_timesteps.get(ti) == si
            matrices.append(self.strided_matrices[ti] if strided else self.multistep_matrix(ti, si))
        return torch.stack(matrices).to(device)

    def _on(self, device: torch.device, name: str) -> torch.Tensor:
        """A transition table moved to ``device`` once and cached (the tables are 8 MB each at T=1000)."""
        key = (name, str(device))
        if key not in self._device_cache:
            self._device_cache[key] = getattr(self, name).to(device)
        return self._device_cache[key]

    def _x0_probs(self, x0_logits: torch.Tensor) -> torch.Tensor:
        """softmax over the K levels of ``(B, K, H, W)`` logits → ``(B, H, W, S)`` float64 (mask state 0)."""
        probs = torch.softmax(x0_logits.double(), dim=1).permute(0, 2, 3, 1)
        return F.pad(probs, (0, self.num_states - self.config.num_classes))

    def q_posterior_logits(
        self,
        x0_logits: torch.Tensor,
        x_t: torch.LongTensor,
        timesteps: torch.LongTensor,
        prev_timesteps: torch.LongTensor | None = None,
    ) -> torch.Tensor:
        """Log-probabilities of x_s given x_t and an x0 distribution (the model's, or a one-hot true x0).

        Args:
            x0_logits: ``(B, K, H, W)`` logits of p̃(x0 | x_t).
            x_t: ``(B, 1, H, W)`` int64 states.
            timesteps: ``(B,)`` t in 1..T.
            prev_timesteps: ``(B,)`` s < t; defaults to t - 1.
        Returns: ``(B, S, H, W)`` float64 normalised log p(x_s | x_t).
        """
        timesteps = torch.as_tensor(timesteps, device=x_t.device).long().reshape(-1).expand(len(x_t))
        if prev_timesteps is None:
            prev_timesteps = timesteps - 1
        prev_timesteps = torch.as_tensor(prev_timesteps, device=x_t.device).long().reshape(-1).expand(len(x_t))
        log_probs = self._posterior_log_probs(self._x0_probs(x0_logits), x_t, timesteps, prev_timesteps)
        return log_probs.permute(0, 3, 1, 2)

    # ------------------------------------------------------------------------------------------- loss
    def hybrid_loss(
        self,
        x0_logits: torch.Tensor,
        x0: torch.LongTensor,
        x_t: torch.LongTensor,
        timesteps: torch.LongTensor,
    ) -> dict[str, torch.Tensor]:
        """L = L_vb + λ·CE, in nats per pixel (Austin et al. eq. 5).

        L_vb is KL(q(x_{t-1} | x_t, x0) ‖ p_θ(x_{t-1} | x_t)) for t > 1 and -log p_θ(x0 | x_1) at t = 1;
        CE = -log p̃_θ(x0 | x_t), the auxiliary x0 cross-entropy.

        Args:
            x0_logits: ``(B, K, H, W)`` model output; x0, x_t: ``(B, 1, H, W)``; timesteps: ``(B,)``.
        Returns: dict with ``loss``, ``vb`` and ``ce`` (scalars).
        """
        prev = timesteps - 1
        true_x0_probs = F.one_hot(x0[:, 0].long(), self.num_states).double()
        true_log_probs = self._posterior_log_probs(true_x0_probs, x_t, timesteps, prev)
        model_log_probs = self._posterior_log_probs(self._x0_probs(x0_logits), x_t, timesteps, prev)
        kl = (true_log_probs.exp() * (true_log_probs - model_log_probs)).sum(-1)  # (B, H, W)
        nll = -model_log_probs.gather(-1, x0[:, 0, ..., None].long())[..., 0]  # (B, H, W)
        vb = torch.where((timesteps == 1)[:, None, None], nll, kl).mean()
        ce = F.cross_entropy(x0_logits.float(), x0[:, 0].long())
        return {"loss": (vb + self.config.hybrid_loss_coeff * ce).float(), "vb": vb.float(), "ce": ce}

    # ------------------------------------------------------------------------------------------- step
    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.LongTensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> D3PMSchedulerOutput | tuple:
        """One reverse step from t to the next chosen timestep s (0 after the last): x_s ~ p_θ(x_s | x_t).

        Args:
            model_output: ``(B, K, H, W)`` x0 logits (log-probabilities after guidance are fine).
            timestep: t, one of ``self.timesteps``.
            sample: x_t, ``(B, 1, H, W)`` int64.
            generator: makes the Gumbel noise reproducible.
        """
        t = int(timestep)
        if t not in self.previous_timesteps:
            raise ValueError(f"timestep {t} is not one of the scheduler's timesteps; call set_timesteps first.")
        expected = (len(sample), self.config.num_classes, *sample.shape[2:])
        if model_output.shape != expected:
            raise ValueError(f"model_output must have shape {expected} (B, K, H, W), got {tuple(model_output.shape)}.")
        self._check_levels(sample, "sample", self.num_states)
        batch = len(sample)
        t_batch = torch.full((batch,), t, dtype=torch.long, device=sample.device)
        s_batch = torch.full_like(t_batch, self.previous_timesteps[t])
        log_probs = self._posterior_log_probs(self._x0_probs(model_output), sample, t_batch, s_batch)
        prev_sample = gumbel_max_sample(log_probs, generator)[:, None]
        pred_original_sample = model_output.argmax(dim=1, keepdim=True)
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return D3PMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def prior_sample(self, shape: tuple[int, ...], generator: torch.Generator | None = None, device=None):
        """x_T ~ q(x_T) ≈ the stationary distribution, ``shape`` = (B, 1, H, W) int64."""
        log_probs = torch.log(self.stationary_distribution().clamp(min=LOG_EPS)).to(device)
        return gumbel_max_sample(log_probs.expand(*shape, self.num_states), generator)

    @staticmethod
    def _check_levels(states: torch.Tensor, name: str, num_states: int) -> None:
        if states.dtype != torch.long or states.dim() != 4 or states.shape[1] != 1:
            raise ValueError(
                f"{name} must be an int64 tensor of shape (B, 1, H, W), got {states.dtype} {tuple(states.shape)}."
            )
        if states.numel() and (states.min() < 0 or states.max() >= num_states):
            raise ValueError(f"{name} values must lie in 0..{num_states - 1}.")

    def __len__(self) -> int:
        return self.config.num_train_timesteps
