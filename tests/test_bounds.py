"""Tests of bounds.py and the bounds of model.py, the likelihood yardstick: the decoders of the discrete-time bounds,
and the adaptive time proposal, whose importance-sampled bound must stay unbiased (checked against the full sum
over t). The unigram baseline is tested in test_prepare.py, the continuous-time processes in test_continuous_time.py."""
import math

import pytest
import torch

from bounds import BoundTimeProposal
from conftest import train_steps
from diffusion import abar_schedule, ids_to_bits, rand, randn
from model import ModelConfig, build_model
from test_model import TOY_SEQS

TOY = dict(vocab_size=8, block_size=4, n_layer=1, n_head=2, n_embd=16, T=20, embed_dim=4)


def toy(model_type, **kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(model_type=model_type, **{**TOY, **kw})).eval()


@pytest.mark.parametrize('model_type', ['embed', 'analog'])
def test_gaussian_logits_add_the_likelihood_of_x_t_under_each_token(model_type):
    """With the network's head silenced, p(w | x_t) must be the exact posterior of a uniform prior over the tokens,
    N(x_t; sqrt(abar_t) c_w, (1 - abar_t) I) normalised over the table's rows c_w, at every t."""
    m = toy(model_type)
    with torch.no_grad():
        m.lm_head.weight.zero_()
    t = torch.tensor([1, 7, 15])
    E = m.table().detach().double()
    x_t = torch.randn(3, 2, E.shape[1])
    logits = m.x0_estimate(x_t, t, torch.zeros_like(x_t))[1]
    for i in range(3):
        a = m.abar[t[i]].item()
        lik = torch.distributions.Normal(math.sqrt(a) * E, math.sqrt(1 - a)).log_prob(x_t.double()[i, :, None, :])
        assert torch.allclose(logits[i].double().log_softmax(-1), lik.sum(-1).log_softmax(-1), atol=1e-4)


@pytest.mark.parametrize('model_type', ['embed', 'analog'])
def test_eps_decoder_adds_the_likelihood_of_x1_under_each_token(model_type):
    m = toy(model_type, predict='eps')
    x1, logits = torch.randn(2, 3, m.table().shape[1]), torch.randn(2, 3, 8)
    a = m.process.abar_1
    E = m.table().detach().double()
    lik = torch.distributions.Normal(math.sqrt(a) * E, math.sqrt(1 - a)).log_prob(x1.double()[..., None, :]).sum(-1)
    expected = (logits.double().log_softmax(-1) + lik).log_softmax(-1)
    assert torch.allclose(m.decoder_logprobs(x1, logits), expected, atol=1e-8)


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


@pytest.mark.parametrize('model_type,net', [('embed', 'denoise'), ('bits', 'id_logits')])
def test_continuous_bound_evaluates_a_uniform_time_inside_the_drawn_cell(model_type, net, monkeypatch):
    """The proposal draws a cell t (here always 7: all its mass there); the continuous bound evaluates its integrand
    at a real time uniform in (6, 7] (then one network call at the decoder's t = 1)."""
    m = toy(model_type, continuous_time=True)
    only_7 = torch.zeros(TOY['T'] - 1, dtype=torch.float64)
    only_7[7 - 2] = 1.0
    monkeypatch.setattr(m.time_proposal, 'probs', lambda: only_7)
    seen, call = [], getattr(m, net)
    monkeypatch.setattr(m, net, lambda x_t, t, *a: seen.append(t) or call(x_t, t, *a))
    B = 512
    m.nll(TOY_SEQS.repeat(B // len(TOY_SEQS), 1), torch.Generator().manual_seed(0))
    u, one = seen
    assert torch.equal(one, torch.ones(B, dtype=torch.float64))
    assert u.dtype == torch.float64 and (u > 6).all() and (u <= 7).all()
    assert abs(u.mean().item() - 6.5) < 4 / math.sqrt(12 * B) and u.min() < 6.05 and u.max() > 6.95


@pytest.mark.parametrize('model_type,scale', [('embed', 20.0), ('embed', 0.3), ('analog', 20.0), ('analog', 0.3)])
def test_gaussian_bound_adds_prior_weighted_step_and_decoder(model_type, scale, monkeypatch):
    """For the t nll() draws (fixed here at 7, with q(t) = 0.25) and its two noise draws, the bound per token is
        [ KL(q(x_T | x_0) || N(0, I)) + KL(q(x_6 | x_7, x_0) || p(x_6 | x_7)) / q(7) - log p(w | x_1) ] / (L ln 2),
    rebuilt here from Normal densities. The head is silenced so that p(w | x_1) is the likelihood of x_1 under each
    token, normalised. Clean states far apart (scale 20) make the prior term large and the decoder's tiny; close
    together (0.3), the other way round: each term is checked where it is large."""
    m = toy(model_type, **({'analog_scale': scale} if model_type == 'analog' else {}))
    with torch.no_grad():
        m.lm_head.weight.zero_()
        if model_type == 'embed':
            m.tok_emb.weight.mul_(scale)
    t, q = 7, 0.25
    monkeypatch.setattr(m.time_proposal, 'draw', lambda n, g, device: (torch.full((n,), t),
                                                                       torch.full((n,), q, dtype=torch.float64)))
    rows = TOY_SEQS
    B, L = rows.shape
    got = m.nll(rows, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)  # the same draws, in the same order: the noise of x_t, then of x_1
    E = m.table().detach().double()
    x0 = E[rows]
    a = abar_schedule('sqrt', TOY['T'])
    a_t, a_s, a_1, a_T = a[t].item(), a[t - 1].item(), a[1].item(), a[-1].item()
    N = torch.distributions.Normal
    x_t = (math.sqrt(a_t) * x0 + math.sqrt(1 - a_t) * randn(x0.shape, g, 'cpu')).float()
    x_1 = (math.sqrt(a_1) * x0 + math.sqrt(1 - a_1) * randn(x0.shape, g, 'cpu')).float()
    with torch.no_grad():
        x0_hat = m.denoise(x_t, torch.full((B,), t))[0].double()
    prior = torch.distributions.kl_divergence(N(math.sqrt(a_T) * x0, math.sqrt(1 - a_T)), N(0.0, 1.0)).sum((1, 2))
    sd = math.sqrt((1 - a_s) * (1 - a_t / a_s) / (1 - a_t))

    def mean(x0_):  # of q(x_s | x_t, x_0 = x0_), s = t - 1
        return (math.sqrt(a_s) * (1 - a_t / a_s) * x0_ + math.sqrt(a_t / a_s) * (1 - a_s) * x_t.double()) / (1 - a_t)
    step = torch.distributions.kl_divergence(N(mean(x0), sd), N(mean(x0_hat), sd)).sum((1, 2))
    lik = N(math.sqrt(a_1) * E, math.sqrt(1 - a_1)).log_prob(x_1.double()[..., None, :]).sum(-1)
    decoder = -lik.log_softmax(-1).gather(-1, rows.unsqueeze(-1)).squeeze(-1).sum(1)
    expected = (prior + step / q + decoder) / (L * math.log(2))
    big = prior if scale > 1 else decoder
    assert (big / (L * math.log(2)) > 1e-5 * expected).all()  # the term checked here is 10x the tolerance
    assert torch.allclose(got, expected, rtol=1e-6, atol=0), (got, expected)


def full_sum_bound(model, rows, g):
    """One draw of the bound with every step t = 2..T summed instead of sampled (the noise still drawn), written
    from the families' public pieces: bits/token per row."""
    B, L = rows.shape
    T = model.config.T
    with torch.no_grad():
        if model.config.model_type == 'bits':
            b0 = ids_to_bits(rows, model.num_bits).double()
            m = (1 + float(model.abar[-1])) / 2
            total = torch.full((B,), model.num_bits * L * (m * math.log(2 * m) + (1 - m) * math.log(2 * (1 - m))), dtype=torch.float64)
            for t in range(2, T + 1):
                t_batch = torch.full((B,), t)
                if model.config.continuous_time:  # the integral over the cell (t - 1, t]: one uniform point in it
                    t_batch = t - rand((B,), g, 'cpu')
                b_t = model.process.q_sample(b0, t_batch, g)
                total += model.bound_term(b0, b_t, model.id_logits(b_t, t_batch), t_batch, g).sum(1)
            one = torch.ones(B, dtype=model.process.time_dtype)
            b_1 = model.process.q_sample(b0, one, g)
            logp = model.decoder_logprobs(b_1, model.id_logits(b_1, one))
        else:
            x0 = model.clean(rows)
            d = model.process
            total = d.prior_kl(x0.double()).sum((1, 2))
            for t in range(2, T + 1):
                t_batch = torch.full((B,), t)
                if model.config.continuous_time:  # the integral over the cell (t - 1, t]: one uniform point in it
                    t_batch = t - rand((B,), g, 'cpu')
                x_t = d.q_sample(x0, t_batch, randn(x0.shape, g, 'cpu').float())
                total += d.kl_step(x0, model.denoise(x_t, t_batch)[0], t_batch).sum((1, 2))
            one = torch.ones(B, dtype=d.time_dtype)
            x_1 = d.q_sample(x0, one, randn(x0.shape, g, 'cpu').float())
            logp = model.decoder_logprobs(x_1, model.denoise(x_1, one)[1])
        total += -logp.gather(-1, rows.unsqueeze(-1)).squeeze(-1).sum(1)
    return total / (L * math.log(2))


def adapted(model):
    """Feed the proposal statistics far from the schedule's shape, so nll() draws t from a non-trivial q."""
    p = model.time_proposal
    t = torch.arange(2, p.T + 1)
    for _ in range(p.warm):
        p.update(t, torch.exp(-t.double() / 3) * 50 + 0.01)
    assert not torch.allclose(p.probs(), p.base)
    return model


@pytest.mark.slow
@pytest.mark.parametrize('model_type,kw', [('embed', {}), ('analog', {}), ('bits', {}),
                                            ('embed', {'continuous_time': True}), ('bits', {'continuous_time': True})])
def test_importance_sampled_bound_equals_the_full_sum_over_t(model_type, kw):
    """nll() draws one t per sequence from the adaptive q and weights KL_t / q(t): its mean over many draws
    must equal the bound with every step summed (within 3 standard errors). In continuous time the sum is of
    the cells' integrals, each estimated at one uniform point of the cell."""
    m = toy(model_type, **kw)
    train_steps(m, TOY_SEQS.repeat(4, 1), 30, lr=1e-2)  # a network past its trivial initialisation
    adapted(m)
    rows = TOY_SEQS.repeat(64, 1)
    est = torch.cat([m.nll(rows, torch.Generator().manual_seed(i)) for i in range(40)])
    g = torch.Generator().manual_seed(12345)
    exact = torch.cat([full_sum_bound(m, TOY_SEQS.repeat(32, 1), g) for _ in range(4)])  # 512 rows
    se = math.sqrt(est.var().item() / len(est) + exact.var().item() / len(exact))
    assert abs(est.mean().item() - exact.mean().item()) < 3 * se, (est.mean(), exact.mean(), se)
