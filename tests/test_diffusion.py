"""Tests of diffusion.py against closed forms: schedules, the Gaussian process (forward moments, the posterior by
Bayes' rule, eps/x0 conversions, DDIM and DDPM steps, the per-step KL, the likelihood of a noisy state), the bit code
and the bit-flip process (its marginals and posterior), continuous time (the schedules pass through the discrete
tables, and the KL integrands are the limits of the discrete steps' KLs), and the bounds' time proposal. The processes
inside each family, and the families' bounds built on them, are tested in test_model.py."""
import math

import pytest
import torch

from diffusion import (NUM_BITS, BitFlipDiffusion, BoundTimeProposal, ContinuousBitFlipDiffusion,
                       ContinuousGaussianDiffusion, GaussianDiffusion, abar_continuous, abar_schedule, bits_to_ids,
                       ids_to_bits)


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


def test_gaussian_step_kl_matches_generic_kl():
    d = GaussianDiffusion(abar_schedule('sqrt', 100))
    x0, x0_hat = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    t = torch.tensor([7, 64])
    xt = d.q_sample(x0, t, torch.randn_like(x0))
    m_q, v = d.q_posterior(x0, xt, t, t - 1)
    m_p, _ = d.q_posterior(x0_hat, xt, t, t - 1)
    assert torch.allclose(d.step_kl(x0, x0_hat, t), (m_q - m_p) ** 2 / (2 * v), rtol=1e-8)


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


# ---------------------------------------------------------------- the bit code and the bit flips

def test_bit_code_round_trips_every_gpt2_id():
    ids = torch.arange(50257)
    bits = ids_to_bits(ids)
    assert bits.shape == (50257, NUM_BITS) and set(bits.unique().tolist()) == {0, 1}
    assert torch.equal(bits_to_ids(bits), ids)
    assert ids_to_bits(torch.tensor(1))[-1] == 1 and ids_to_bits(torch.tensor(2 ** 15))[0] == 1  # MSB first
    assert len({tuple(b) for b in bits[:: 97].tolist()}) == len(bits[:: 97])  # distinct codes


def test_flip_marginals_match_closed_form():
    d = BitFlipDiffusion(abar_schedule('linear', 100))
    b0 = (torch.rand(200_000, NUM_BITS, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    g = torch.Generator().manual_seed(1)
    for t in (1, 10, 50, 100):
        bt = d.q_sample(b0, torch.full((b0.shape[0],), t), g)
        rate = (bt != b0).double().mean().item()
        expected = (1 - d.abar[t].item()) / 2
        assert rate == pytest.approx(expected, abs=4 * math.sqrt(expected * (1 - expected) / b0.numel()) + 1e-6)


@pytest.mark.parametrize('t,s', [(2, 1), (40, 39), (90, 10), (100, 1)])
def test_bit_posterior_equals_bayes_rule_enumerated(t, s):
    """q(b_s | b_t, b_0) from the joint q(b_s | b_0) q(b_t | b_s), enumerated over the 2x2 cases (b_0, b_t)."""
    d = BitFlipDiffusion(abar_schedule('cosine', 100))
    abar = d.abar
    flip_0s = (1 - abar[s].item()) / 2
    flip_st = (1 - abar[t].item() / abar[s].item()) / 2

    def q(b_next, b_prev, flip):
        return flip if b_next != b_prev else 1 - flip

    for b0 in (0, 1):
        for bt in (0, 1):
            joint = {bs: q(bs, b0, flip_0s) * q(bt, bs, flip_st) for bs in (0, 1)}
            expected = joint[1] / (joint[0] + joint[1])
            got = d.posterior_prob_one(torch.tensor([[float(bt)]]), torch.tensor([[float(b0)]]),
                                               torch.tensor([t]), torch.tensor([s])).item()
            assert got == pytest.approx(expected, rel=1e-9)
    # the model's forward draw and its posterior compose into the forward marginal at s: b_t ~ q(b_t | b_0), then
    # b_s ~ q(b_s | b_t, b_0) flips each bit of b_0 with probability (1 - abar_s) / 2
    g = torch.Generator().manual_seed(0)
    b0 = (torch.rand(100_000, NUM_BITS, generator=g) < 0.5).float()
    n = b0.shape[0]
    b_t = d.q_sample(b0, torch.full((n,), t), g)
    p1 = d.posterior_prob_one(b_t, b0, torch.full((n,), t), torch.full((n,), s))
    b_s = (torch.rand(b0.shape, generator=g, dtype=torch.float64) < p1).float()
    rate = (b_s != b0).double().mean().item()
    assert rate == pytest.approx(flip_0s, abs=5 * math.sqrt(flip_0s * (1 - flip_0s) / b0.numel()) + 1e-9)


# ---------------------------------------------------------------- continuous time

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
        integral = cont.step_kl(x0.expand(n, 3), x0_hat.expand(n, 3), u).mean(0)
        assert torch.allclose(integral, disc.step_kl(x0, x0_hat, torch.tensor([t]))[0], rtol=1e-3), t


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


# ---------------------------------------------------------------- the bounds' time proposal

def test_time_proposal_follows_the_root_second_moment_per_bin():
    p = BoundTimeProposal(abar_schedule('sqrt', 100), bins=4, warm=2)
    assert torch.equal(p.probs(), p.base)  # no statistics yet: the schedule's proposal
    level = torch.tensor([1.0, 4.0, 9.0, 16.0], dtype=torch.float64)
    t = torch.arange(2, 101)
    for _ in range(3):
        p.update(t, level[p.bin_of])
    q = p.probs()
    assert q.sum().item() == pytest.approx(1.0)
    mass = torch.zeros(4, dtype=torch.float64).index_add_(0, p.bin_of, q)
    base_mass = torch.zeros(4, dtype=torch.float64).index_add_(0, p.bin_of, p.base)
    adapted = (mass - 0.1 * base_mass) / 0.9
    assert torch.allclose(adapted / adapted.sum(), level / level.sum(), atol=1e-9)  # sqrt(E[KL^2]) = level


@pytest.mark.parametrize('continuous', [False, True])
def test_time_proposal_draws_t_with_its_own_probability(continuous):
    """The importance weight 1 / q(t) is unbiased only if each draw of t comes with q of that very step: q_t must be
    probs()[t - 2] for t in 2..T (in continuous time, of the cell (t - 1, t] holding the real t), and the steps
    must be drawn with those probabilities (within 5 standard errors of each step's frequency, 200,000 draws)."""
    p = BoundTimeProposal(abar_schedule('sqrt', 100), bins=4, warm=2, continuous=continuous)
    for _ in range(3):  # adapted: a q with unequal neighbours, so a draw paired with the next step's q shows
        p.update(torch.arange(2, 101), torch.tensor([1.0, 4.0, 9.0, 16.0], dtype=torch.float64)[p.bin_of])
    q = p.probs()
    N = 200_000
    t, q_t = p.draw(N, torch.Generator().manual_seed(0), 'cpu')
    step = t.ceil().long() if continuous else t
    assert step.min() >= 2 and step.max() <= 100 and (not continuous or ((step - t >= 0) & (step - t < 1)).all())
    assert torch.equal(q_t, q[step - 2])
    freq = torch.bincount(step - 2, minlength=99).double() / N
    assert ((freq - q).abs() < 5 * (q * (1 - q) / N).sqrt() + 1e-12).all()
