"""Tests of continuous_time.py: the continuous-time schedules pass through the discrete tables, and the
continuous-time KL integrands (Gaussian and bit flips) are the limits of the discrete steps' KLs."""
import pytest
import torch

from continuous_time import ContinuousBitFlipDiffusion, ContinuousGaussianDiffusion, abar_continuous
from diffusion import GaussianDiffusion, abar_schedule


@pytest.mark.parametrize('name', ['linear', 'cosine', 'sqrt'])
def test_continuous_schedule_passes_through_the_discrete_table_with_its_slope(name):
    """abar(t) of continuous time is the function the discrete table samples (cosine, sqrt: at every step, the
    clipped last one included; linear: its limit, so only close), and d abar / dt is its derivative."""
    for T in (20, 1000):
        a, _ = abar_continuous(name, T)(torch.arange(T + 1, dtype=torch.float64))
        table = abar_schedule(name, T)
        if name == 'linear':  # the discrete betas approach the continuous rate as T grows: 28% off at T = 20
            assert T == 20 or torch.allclose(a[:T // 2], table[:T // 2], rtol=0.01)
        else:
            assert torch.allclose(a, table, rtol=1e-10, atol=0)
    schedule = abar_continuous(name, 100)
    t = torch.linspace(0.5, 99.5, 199, dtype=torch.float64)
    h = 1e-5
    slope = (schedule(t + h)[0] - schedule(t - h)[0]) / (2 * h)
    assert torch.allclose(schedule(t)[1], slope, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize('name', ['cosine', 'sqrt'])
def test_continuous_kl_integrates_over_a_cell_to_the_discrete_step(name):
    """For an x0 estimate that does not depend on t, the integrand 0.5 (-dSNR/dt) (x0 - x0_hat)^2 integrated over the
    cell (t - 1, t] is the discrete step's KL, 0.5 (SNR_{t-1} - SNR_t) (x0 - x0_hat)^2, for every cell (the
    clipped last one too)."""
    T = 20
    cont, disc = ContinuousGaussianDiffusion(name, T), GaussianDiffusion(abar_schedule(name, T))
    g = torch.Generator().manual_seed(0)
    x0, x0_hat = torch.randn(1, 3, generator=g, dtype=torch.float64), torch.randn(1, 3, generator=g, dtype=torch.float64)
    n = 20000  # midpoints in each cell
    for t in range(2, T + 1):
        u = t - 1 + (torch.arange(n, dtype=torch.float64) + 0.5) / n
        integral = cont.kl_step(x0.expand(n, 3), x0_hat.expand(n, 3), u).mean(0)
        assert torch.allclose(integral, disc.kl_step(x0, x0_hat, torch.tensor([t]))[0], rtol=1e-3), t


@pytest.mark.parametrize('b0,p1', [(1.0, 0.3), (0.0, 0.3), (1.0, 0.95)])
def test_bit_rate_integrand_is_the_limit_of_the_discrete_steps(b0, p1):
    """One bit, clean value b0, a model that says P(b_0 = 1) = p1 whatever it sees. Cut a cell (t - 1, t] into 4000
    steps: the sum of their KLs, KL(q(b_s | b_u, b_0) || p(b_s | b_u)) averaged exactly over b_u ~ q(b_u | b_0),
    must match the integral of rate_kl over the cell (midpoints, the same exact average) as the steps shrink."""
    d = ContinuousBitFlipDiffusion('cosine', 20)
    n = 4000
    clean, model = torch.full((n, 1), b0, dtype=torch.float64), torch.full((n, 1), p1, dtype=torch.float64)

    def bern_kl(p, q):
        return p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
    for t in (2, 10, 19):  # (the last cell is where the cosine table is clipped)
        edges = t - 1 + torch.arange(n + 1, dtype=torch.float64) / n
        u, s, mid = edges[1:], edges[:-1], (edges[1:] + edges[:-1]) / 2
        steps = integral = 0.0
        for b in (0.0, 1.0):  # the bit's state at the later time, weighted by q(b | b0)
            b_u = torch.full((n, 1), b)
            def q_of(time):
                stay = d.stay_prob(time, torch.zeros_like(time), b_u)[:, 0]
                return stay if b == b0 else 1 - stay
            true = d.posterior_prob_one(b_u, clean, u, s)[:, 0]
            steps += (q_of(u) * bern_kl(true.clamp(1e-300, 1 - 1e-16), d.posterior_prob_one(b_u, model, u, s)[:, 0])).sum()
            integral += (q_of(mid) * d.rate_kl(clean, b_u, model, mid)).mean()
        assert steps.item() == pytest.approx(integral.item(), rel=1e-3), t
