"""The D3PM maths: transition matrices, forward sampling, posteriors, strided sampling."""

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare

from d3pm_hub import D3PMScheduler
from d3pm_hub.scheduler import TRANSITION_TYPES

K = 5


@pytest.fixture(params=TRANSITION_TYPES)
def scheduler(request) -> D3PMScheduler:
    return D3PMScheduler(num_train_timesteps=40, num_classes=K, transition_type=request.param)


def one_hot_logits(x0: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Logits (B, K, H, W) that put all mass on x0 (B, 1, H, W): a perfect x0 predictor."""
    return 1e3 * F.one_hot(x0[:, 0], num_classes).permute(0, 3, 1, 2).double()


def test_matrices_are_row_stochastic(scheduler):
    assert (scheduler.q_onestep >= 0).all() and (scheduler.q_cumulative >= 0).all()
    torch.testing.assert_close(scheduler.q_onestep.sum(-1), torch.ones_like(scheduler.q_onestep[..., 0]))
    torch.testing.assert_close(scheduler.q_cumulative.sum(-1), torch.ones_like(scheduler.q_cumulative[..., 0]))


def test_cumulative_is_product_of_onestep(scheduler):
    product = torch.eye(scheduler.num_states, dtype=torch.float64)
    for t in range(1, len(scheduler) + 1):
        product = product @ scheduler.q_onestep[t]
        torch.testing.assert_close(scheduler.q_cumulative[t], product)


@pytest.mark.parametrize("transition_type", TRANSITION_TYPES)
def test_stationary_distribution(transition_type):
    # 32 levels as shipped: the discretised Gaussian's bandwidth scales with (K-1)², so it mixes at K = 32.
    levels = 32
    scheduler = D3PMScheduler(num_train_timesteps=1000, num_classes=levels, transition_type=transition_type)
    stationary = scheduler.stationary_distribution()
    expected = torch.full((levels,), 1 / levels, dtype=torch.float64)
    if transition_type == "absorbing":
        expected = F.one_hot(torch.tensor(levels), levels + 1).double()
    torch.testing.assert_close(stationary, expected)
    for t in (1, 500, 1000):  # a fixed point of every step
        torch.testing.assert_close(stationary @ scheduler.q_onestep[t], stationary)
    # and where every row of Q̄_T ends up
    final = scheduler.q_cumulative[-1]
    torch.testing.assert_close(final, stationary.expand_as(final), atol=2e-3, rtol=0)


def test_add_noise_matches_marginal(scheduler):
    t, x0_level, n = 12, 2, 20000
    x0 = torch.full((1, 1, 100, n // 100), x0_level)
    x_t = scheduler.add_noise(x0, torch.tensor([t]), generator=torch.Generator().manual_seed(0))
    observed = torch.bincount(x_t.flatten(), minlength=scheduler.num_states).double()
    expected = scheduler.q_cumulative[t, x0_level] * n
    support = expected > 0
    assert observed[~support].sum() == 0
    assert chisquare(observed[support], expected[support]).pvalue > 1e-3


def test_posterior_is_bayes_rule(scheduler):
    """q(x_s | x_t, x0) = q(x_t | x_s) q(x_s | x0) / q(x_t | x0), brute force over every (x0, x_t)."""
    S = scheduler.num_states
    for t, s in [(7, 6), (20, 3), (40, 0)]:
        q_ts = scheduler.multistep_matrix(t, s)
        for x0 in range(K):
            x_t = torch.arange(S).reshape(1, 1, 1, S)
            # x_t values with q(x_t | x0) < 1e-6 are skipped: there both sides are ratios of rounding errors.
            reachable = scheduler.q_cumulative[t, x0] > 1e-6
            logits = scheduler.q_posterior_logits(
                one_hot_logits(torch.full((1, 1, 1, S), x0), K), x_t, torch.tensor([t]), torch.tensor([s])
            )[0, :, 0, :]  # (S over x_s, S over x_t)
            for j in torch.nonzero(reachable).flatten().tolist():
                bayes = q_ts[:, j] * scheduler.q_cumulative[s, x0] / scheduler.q_cumulative[t, x0, j]
                torch.testing.assert_close(logits[:, j].exp(), bayes, atol=1e-9, rtol=1e-6)


def test_multistep_matrix_is_product(scheduler):
    torch.testing.assert_close(
        scheduler.q_cumulative[5] @ scheduler.multistep_matrix(30, 5), scheduler.q_cumulative[30]
    )
    scheduler.set_timesteps(4)
    for t, s in scheduler.previous_timesteps.items():
        product = torch.linalg.multi_dot(
            [torch.eye(scheduler.num_states, dtype=torch.float64)]
            + [scheduler.q_onestep[i] for i in range(s + 1, t + 1)]
        )
        torch.testing.assert_close(scheduler.strided_matrices[t], product)


def test_set_timesteps_descends_to_one(scheduler):
    scheduler.set_timesteps(7)
    steps = scheduler.timesteps.tolist()
    assert steps[0] == len(scheduler) and steps[-1] == 1 and steps == sorted(steps, reverse=True)
    assert scheduler.previous_timesteps[1] == 0


@pytest.mark.parametrize("num_steps", [1, 5, 40])
def test_strided_sampler_with_oracle_returns_x0(scheduler, num_steps):
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, K, (3, 1, 6, 6), generator=generator)
    scheduler.set_timesteps(num_steps)
    sample = scheduler.prior_sample(x0.shape, generator)
    for t in scheduler.timesteps.tolist():
        sample = scheduler.step(one_hot_logits(x0, K), t, sample, generator=generator).prev_sample
    assert torch.equal(sample, x0)


def test_step_is_deterministic_with_generator(scheduler):
    scheduler.set_timesteps(10)
    logits = torch.randn(2, K, 4, 4)
    sample = scheduler.prior_sample((2, 1, 4, 4), torch.Generator().manual_seed(1))
    t = scheduler.timesteps[0].item()
    first = scheduler.step(logits, t, sample, generator=torch.Generator().manual_seed(3)).prev_sample
    second = scheduler.step(logits, t, sample, generator=torch.Generator().manual_seed(3)).prev_sample
    assert torch.equal(first, second)


def test_hybrid_loss_is_small_for_a_perfect_model(scheduler):
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, K, (8, 1, 4, 4), generator=generator)
    timesteps = torch.randint(1, 41, (8,), generator=generator)
    x_t = scheduler.add_noise(x0, timesteps, generator)
    perfect = scheduler.hybrid_loss(one_hot_logits(x0, K).float() / 50, x0, x_t, timesteps)
    random = scheduler.hybrid_loss(torch.randn(8, K, 4, 4), x0, x_t, timesteps)
    assert perfect["vb"] < 1e-3 and perfect["ce"] < 1e-3
    assert random["loss"] > perfect["loss"]


def test_save_load_round_trip(scheduler, tmp_path):
    scheduler.save_pretrained(tmp_path)
    loaded = D3PMScheduler.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(scheduler.config)
    torch.testing.assert_close(loaded.q_cumulative, scheduler.q_cumulative)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="transition_type"):
        D3PMScheduler(transition_type="cauchy")
    scheduler = D3PMScheduler(num_train_timesteps=40, num_classes=K)
    for steps in (0, 41, 2.5):
        with pytest.raises(ValueError, match="num_inference_steps"):
            scheduler.set_timesteps(steps)
    with pytest.raises(ValueError, match="int64"):
        scheduler.add_noise(torch.zeros(1, 1, 4, 4), torch.tensor([3]))
    with pytest.raises(ValueError, match="0..4"):
        scheduler.add_noise(torch.full((1, 1, 4, 4), K), torch.tensor([3]))
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="shape"):
        scheduler.step(torch.randn(1, K + 1, 4, 4), 40, torch.zeros(1, 1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="not one of"):
        scheduler.step(torch.randn(1, K, 4, 4), 39, torch.zeros(1, 1, 4, 4, dtype=torch.long))
    x = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    for t in (0, 41):  # t = 0 would index Q̄ at s = -1, i.e. wrap round to Q̄_T
        with pytest.raises(ValueError, match="0 <= s < t <= 40"):
            scheduler.hybrid_loss(torch.randn(1, K, 4, 4), x, x, torch.tensor([t]))
        with pytest.raises(ValueError, match="0 <= s < t <= 40"):
            scheduler.q_posterior_logits(torch.randn(1, K, 4, 4), x, torch.tensor([t]))
    with pytest.raises(ValueError, match="0 <= s < t"):
        scheduler.q_posterior_logits(torch.randn(1, K, 4, 4), x, torch.tensor([5]), torch.tensor([5]))
    with pytest.raises(ValueError, match="timesteps must lie in 0..40"):
        scheduler.add_noise(x, torch.tensor([41]))
