"""Tests of diffusion.py's Gaussian process against closed forms: schedules, forward moments, the posterior by
Bayes' rule, eps/x0 conversions, DDIM and DDPM steps, the per-step KL. (The bit-flip and mask processes are tested
beside their families, in test_bits.py and test_mask_ar.py.)"""
import math

import pytest
import torch

from diffusion import GaussianDiffusion, abar_schedule


@pytest.mark.parametrize('name', ['linear', 'cosine', 'sqrt'])
def test_schedules_are_monotone_from_one_to_zero(name):
    abar = abar_schedule(name, 1000)
    assert abar[0] == 1.0 and abar[1] > 0.95 and abar[-1] < 1e-2  # sqrt adds noise fastest: 0.977
    assert (abar[1:] < abar[:-1]).all()


def test_q_sample_moments_match_closed_form():
    d = GaussianDiffusion(abar_schedule('cosine', 100))
    torch.manual_seed(0)
    x0 = torch.tensor([1.5, -0.5, 0.0], dtype=torch.float64).expand(200_000, 3)
    t = torch.full((200_000,), 40)
    xt = d.q_sample(x0, t, torch.randn_like(x0))
    a = d.abar[40].item()
    se = math.sqrt((1 - a) / 200_000)
    assert torch.allclose(xt.mean(0), math.sqrt(a) * x0[0], atol=5 * se)
    assert torch.allclose(xt.var(0), torch.full((3,), 1 - a, dtype=torch.float64), rtol=0.02)


@pytest.mark.parametrize('t,s', [(10, 9), (60, 59), (80, 20), (100, 1)])
def test_posterior_matches_bayes_rule(t, s):
    """q(x_s | x_t, x_0) ∝ q(x_s | x_0) q(x_t | x_s): a product of Gaussians in x_s, done by precisions."""
    d = GaussianDiffusion(abar_schedule('linear', 100))
    x0, xt = torch.tensor([[0.7, -1.2]], dtype=torch.float64), torch.tensor([[0.1, 2.0]], dtype=torch.float64)
    a_s, a_t = d.abar[s].item(), d.abar[t].item()
    a_ts = a_t / a_s
    precision = 1 / (1 - a_s) + a_ts / (1 - a_ts)
    mean = (math.sqrt(a_s) * x0 / (1 - a_s) + math.sqrt(a_ts) * xt / (1 - a_ts)) / precision
    got_mean, got_var = d.q_posterior(x0, xt, torch.tensor([t]), torch.tensor([s]))
    assert torch.allclose(got_mean, mean, atol=1e-10)
    assert got_var.item() == pytest.approx(1 / precision, rel=1e-9)


def test_eps_and_x0_conversions_agree():
    d = GaussianDiffusion(abar_schedule('cosine', 100))
    x0, eps = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    t = torch.tensor([1, 30, 70, 99])
    xt = d.q_sample(x0, t, eps)
    assert torch.allclose(d.x0_from_eps(xt, t, eps), x0, atol=1e-8)
    assert torch.allclose(d.eps_from_x0(xt, t, x0), eps, atol=1e-8)


def test_ddim_deterministic_at_eta0_and_ddpm_at_eta1():
    d = GaussianDiffusion(abar_schedule('cosine', 100))
    x0, xt = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    z1, z2 = torch.randn_like(xt), torch.randn_like(xt)
    for t, s in [(50, 49), (90, 30)]:
        t_batch, s_batch = torch.full((3,), t), torch.full((3,), s)
        assert torch.equal(d.ddim_step(x0, xt, t_batch, s_batch, 0.0, z1),
                           d.ddim_step(x0, xt, t_batch, s_batch, 0.0, z2))
        mean, var = d.q_posterior(x0, xt, t_batch, s_batch)
        no_noise = d.ddim_step(x0, xt, t_batch, s_batch, 1.0, torch.zeros_like(xt))
        assert torch.allclose(no_noise, mean, atol=1e-10)                        # same mean ...
        sigma = (d.ddim_step(x0, xt, t_batch, s_batch, 1.0, z1) - no_noise) / z1
        assert torch.allclose(sigma ** 2, var.expand_as(sigma), rtol=1e-6)      # ... and the DDPM variance
        assert torch.allclose(d.ddpm_step(x0, xt, t_batch, s_batch, z1), no_noise + sigma * z1, atol=1e-10)


def test_gaussian_kl_step_matches_generic_kl():
    d = GaussianDiffusion(abar_schedule('sqrt', 100))
    x0, x0_hat = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    t = torch.tensor([7, 64])
    xt = d.q_sample(x0, t, torch.randn_like(x0))
    m_q, v = d.q_posterior(x0, xt, t, t - 1)
    m_p, _ = d.q_posterior(x0_hat, xt, t, t - 1)
    assert torch.allclose(d.kl_step(x0, x0_hat, t), (m_q - m_p) ** 2 / (2 * v), rtol=1e-8)


@pytest.mark.parametrize('per_row', [False, True])
def test_token_loglik_is_the_gaussian_log_density_up_to_a_constant_per_position(per_row):
    """log q(x_t | w) = -||x_t - sqrt(a) c_w||^2 / (2 (1 - a)) + const, for one abar or one per row of x_t."""
    g = torch.Generator().manual_seed(0)
    E = torch.randn(7, 3, generator=g, dtype=torch.float64)
    x = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    a = torch.tensor([0.3, 0.8], dtype=torch.float64).view(2, 1, 1) if per_row else 0.6
    got = GaussianDiffusion(abar_schedule('linear', 10)).token_loglik(x, a, E, torch.float64)
    aa = torch.as_tensor(a, dtype=torch.float64).expand(2, 1, 1)
    exact = -((x[:, :, None, :] - aa.sqrt()[..., None] * E) ** 2).sum(-1) / (2 * (1 - aa))  # (2, 4, 7)
    diff = got - exact
    assert torch.allclose(diff, diff[..., :1].expand_as(diff), atol=1e-9)  # the same constant for every w
