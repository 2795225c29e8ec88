"""Backbone, Gaussian process maths and the `embed` family (Diffusion-LM), checked against closed forms."""
import math

import pytest
import torch

from checkpoint import load_checkpoint, save_checkpoint
from conftest import best_match, compact_vocab, train_steps
from diffusion import GaussianDiffusion, abar_schedule, ids_to_bits
from model import ModelConfig, TimestepEmbedder, apply_rotary, build_model, rotary_tables
from util import configure_optimizer

TINY = dict(block_size=16, n_layer=2, n_head=2, n_embd=32, T=50, embed_dim=8)


def tiny(model_type='embed', **kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(**{**TINY, 'vocab_size': 100, 'model_type': model_type, **kw}))


# ---------------------------------------------------------------- backbone

def test_time_embedding_matches_formula():
    t = torch.tensor([0.0, 0.37, 1.0])
    feats = TimestepEmbedder.timestep_features(t, 8)
    for i, ti in enumerate(t.tolist()):
        for k in range(4):
            omega = math.exp(-math.log(10000) * k / 4)
            assert feats[i, k].item() == pytest.approx(math.cos(1000 * ti * omega), abs=1e-4)
            assert feats[i, 4 + k].item() == pytest.approx(math.sin(1000 * ti * omega), abs=1e-4)


@pytest.mark.parametrize('model_type', ['embed', 'bits', 'analog'])
def test_adaln_zero_blocks_are_identity_at_init(model_type):
    m = tiny(model_type)
    x, c = torch.randn(3, 16, 32), torch.randn(3, 32)
    for block in m.backbone.blocks:
        assert torch.equal(block(x, c), x)
    # the whole backbone is then positions + a plain LayerNorm (the final modulation is zero too)
    out = m.backbone(x, torch.rand(3))
    expected = torch.nn.functional.layer_norm(x + m.backbone.wpe.weight[:16], (32,), eps=1e-6)
    assert torch.allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize('model_type', ['mask', 'ar'])
def test_blocks_without_time_input_start_as_plain_pre_ln_blocks(model_type):
    """No time input: constant per-channel modulation with the gates at 1, i.e. x + attn(LN x), + mlp(LN x)."""
    m = tiny(model_type)
    x = torch.randn(3, 16, 32)
    ln = lambda z: torch.nn.functional.layer_norm(z, (32,), eps=1e-6)  # noqa: E731
    for block in m.backbone.blocks:
        h = x + block.attn(ln(x))
        assert torch.allclose(block(x, None), h + block.mlp(ln(h)), atol=1e-6)
    assert not any('adaLN' in n for n, _ in m.named_parameters())  # no matmul on a constant


def test_bad_config_fails_clearly():
    with pytest.raises(ValueError, match='model_type'):
        ModelConfig(model_type='gpt')
    with pytest.raises(ValueError, match='n_embd=30 is not divisible by n_head=4'):
        ModelConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match='noise_schedule'):
        ModelConfig(noise_schedule='quadratic')
    with pytest.raises(ValueError, match='unknown model argument'):
        build_model({'model_type': 'embed', 'n_layers': 3})


def test_rotary_scores_depend_only_on_relative_position():
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq, pk):
        cq, sq = rotary_tables(torch.tensor([pq]), 16)
        ck, sk = rotary_tables(torch.tensor([pk]), 16)
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum().item()
    assert score(5, 2) == pytest.approx(score(12, 9), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)
    m = tiny('mask', rotary=True)
    assert m.backbone.wpe is None and torch.isfinite(m(torch.randint(0, 100, (2, 16))))


# ---------------------------------------------------------------- schedules and the Gaussian process

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


# ---------------------------------------------------------------- training signal

@pytest.mark.parametrize('model_type,kw', [('embed', {}), ('embed', {'predict': 'eps', 'cfg_drop': 0.2}),
                                            ('embed', {'continuous_time': True}),
                                            ('bits', {}), ('analog', {}), ('analog', {'predict': 'eps'}),
                                            ('analog', {'predict': 'eps', 'continuous_time': True}),
                                            ('bits', {'continuous_time': True}),
                                            ('mask', {'time_cond': True}), ('ar', {})])
def test_loss_is_finite_and_gradients_reach_every_parameter(model_type, kw):
    m = tiny(model_type, **kw)
    idx = torch.randint(0, 100, (4, 16 + m.extra_tokens))
    train_steps(m, idx, 3, lr=1e-2)  # move the zero-initialised gates so gradients flow through the blocks
    m.train()
    loss = m(idx)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_checkpoint_roundtrip(tmp_path):
    m = tiny('embed', self_cond=False)
    path = tmp_path / 'ckpt.pt'
    save_checkpoint(str(path), {'model_args': {**TINY, 'vocab_size': 100, 'self_cond': False},
                                'model': m.state_dict(), 'ema': None})
    assert [p.name for p in tmp_path.iterdir()] == ['ckpt.pt']  # no temp file left behind
    m2, ckpt = load_checkpoint(str(tmp_path))
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(FileNotFoundError, match='no checkpoint'):
        load_checkpoint(str(tmp_path / 'nowhere'))


# ---------------------------------------------------------------- embed: memorise real text, sample it back

@pytest.fixture(scope='module')
def overfit_embed(story_batch):
    batch, K, _ = compact_vocab(story_batch(4, 24))
    m = build_model(ModelConfig(model_type='embed', vocab_size=K, block_size=24, n_layer=2, n_head=2, n_embd=64,
                                T=100, embed_dim=16))
    first, last = train_steps(m, batch, 600)
    return m, batch, first, last


def test_embed_overfits_real_text(overfit_embed):
    m, batch, first, last = overfit_embed
    assert last < first / 5, (first, last)


@pytest.mark.parametrize('sampler,steps', [('ddpm', 100), ('ddim', 25)])
def test_embed_samplers_reproduce_memorised_text(overfit_embed, sampler, steps):
    m, batch, _, _ = overfit_embed
    out = m.sample(8, 24, steps=steps, generator=torch.Generator().manual_seed(0), sampler=sampler)
    assert m.nfe == steps + 1  # self-conditioning: a second pass at the first step only
    # the x0 estimate is a posterior mean, so while the noise still hides which memorised row a sample follows
    # it sits between rows, and some positions then settle on another row's token: most, not all, come back
    # (chance level is 1/K ~ 0.02)
    assert best_match(out, batch).mean() > 0.6


def test_embed_same_seed_same_text_and_clamping_reproduces_text(overfit_embed):
    m, batch, _, _ = overfit_embed
    a = m.sample(2, 24, steps=10, generator=torch.Generator().manual_seed(1))
    b = m.sample(2, 24, steps=10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    # clamping snaps every x0 estimate to an embedding, so it commits to tokens early (from noisy estimates):
    # it still recovers most of the memorised text, with a lower bar than the plain samplers
    c = m.sample(8, 24, steps=25, generator=torch.Generator().manual_seed(1), clamp=True)
    assert best_match(c, batch).mean() > 0.55


@pytest.mark.parametrize('model_type,kw', [('embed', {}), ('embed', {'cfg_drop': 0.1}), ('analog', {}), ('bits', {}),
                                            ('mask', {}), ('embed', {'continuous_time': True}),
                                            ('bits', {'continuous_time': True})])
def test_network_reads_the_fixed_tokens_noised_to_the_current_time(model_type, kw):
    """Infilling by imputation: at every step the network's input at the fixed positions is a fresh draw of
    q(x_t | x_0 = the fixed tokens) at the time t it is told (mask: the tokens themselves, never [MASK]). The
    output keeps them anyway (the sampler pastes them over its result), so only the input shows whether they
    condition the rest. Gaussian: (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t) must be standard normal; bits: each
    bit flipped with probability (1 - abar_t) / 2."""
    m = tiny(model_type, **kw).eval()
    train_steps(m, torch.randint(0, 100, (8, 16)), 3, lr=1e-2)  # move the zero-initialised gates
    fixed = torch.full((1, 16), -1)
    fixed[0, :4] = torch.tensor([3, 1, 4, 1])
    fixed[0, 10:12] = torch.tensor([5, 9])
    keep = fixed[0] >= 0
    seen = []
    name = {'mask': 'log_probs', 'bits': 'id_logits'}.get(model_type, 'x0_estimate')  # the network's one pass
    net = getattr(m, name)
    def spy(x, t, *args, **kwargs):
        seen.append((x[:, keep].double(), t))
        return net(x, t, *args, **kwargs)
    setattr(m, name, spy)
    opts = {'guidance_scale': 2.0} if kw.get('cfg_drop') else {}
    m.sample(64, 16, steps=5, fixed=fixed, generator=torch.Generator().manual_seed(0), **opts)
    assert len({float(t[0]) for _, t in seen}) == 5  # the network saw every step's time
    if kw.get('continuous_time'):  # real times, each a fresh draw of q(x_t | x_0) at that real t (below)
        assert all(t.dtype == torch.float64 for _, t in seen)
    for x, t in seen:
        if model_type == 'mask':
            assert torch.equal(x, fixed[0, keep].double().expand_as(x))
            continue
        a = m.process.abar_of(t[:1]).item()  # abar at the (integer or real) time the network was told
        if model_type == 'bits':
            flips = (x != ids_to_bits(fixed[0, keep], m.num_bits).double()).double()
            p = (1 - a) / 2
            assert abs(flips.mean().item() - p) < 5 * math.sqrt(p * (1 - p) / flips.numel()) + 1e-9, (t[0], p)
        else:
            z = (x - math.sqrt(a) * m.clean(fixed[0, keep]).double()) / math.sqrt(1 - a)
            n = z.numel()
            assert abs(z.mean().item()) < 5 / math.sqrt(n), (t[0], z.mean())
            assert abs((z ** 2).mean().item() - 1) < 5 * math.sqrt(2 / n), (t[0], (z ** 2).mean())


def test_continuous_time_samples_on_equal_real_steps_down_to_zero():
    """Continuous time: 7 steps from T = 50 are 7 equal real intervals (discrete time rounds them to steps), and a
    step lands where it was sent: at s = 0 the state is the x0 estimate (abar = 1, no noise left)."""
    m = tiny('embed', continuous_time=True).eval()
    grid = m.time_grid(7, None)
    assert [t for t, _ in grid] == pytest.approx([50 * (1 - i / 7) for i in range(7)], abs=1e-12)
    assert [s for _, s in grid] == [t for t, _ in grid[1:]] + [0.0]
    assert grid[-1][1] == 0.0 and grid[2][0] == pytest.approx(50 * 5 / 7) and grid[2][0] != round(grid[2][0])
    state = m.init_state(2, 16, torch.full((2, 16), -1), torch.Generator().manual_seed(0), m.sample_options)
    state = m.step(state, 50 / 7, 0.0, torch.full((2, 16), -1), torch.Generator().manual_seed(1), m.sample_options)
    assert torch.allclose(state['x'], state['x0_hat'], atol=1e-6)


def test_guidance_extrapolates_from_the_unconditional_prediction():
    """Classifier-free guidance with scale w: logits and x0 estimate are u + w (c - u), from the prediction c with
    the prompt as condition and u with none (all -1): w = 1 is the conditional model, w > 1 pushes past it."""
    m = tiny('embed', cfg_drop=0.1).eval()
    train_steps(m, torch.randint(0, 100, (8, 16)), 3, lr=1e-2)  # move the zero-initialised gates
    fixed = torch.full((2, 16), -1)
    fixed[:, :5] = torch.tensor([3, 1, 4, 1, 5])
    w, T = 3.0, m.config.T
    opts = m.check_sample_args(16, 5, {'guidance_scale': w})
    state = m.init_state(2, 16, fixed, torch.Generator().manual_seed(0), opts)
    new = m.step(state, T, T - 10, fixed, torch.Generator().manual_seed(1), opts)
    t_batch = torch.full((2,), T)
    with torch.no_grad():
        x0_c, out_c, _ = m.denoise(state['x'], t_batch, fixed)
        x0_u, out_u, _ = m.denoise(state['x'], t_batch, torch.full_like(fixed, -1))
    assert not torch.allclose(out_c, out_u, atol=1e-3)  # the condition matters, so the formula is visible
    assert torch.allclose(new['out'], out_u + w * (out_c - out_u), atol=1e-5)
    assert torch.allclose(new['x0_hat'], x0_u + w * (x0_c - x0_u), atol=1e-5)


def test_sampler_rejects_bad_requests():
    m = tiny('embed').eval()
    with pytest.raises(ValueError, match='steps=51 out of range'):
        m.sample(1, 8, steps=51)
    with pytest.raises(ValueError, match='no sampling option'):
        m.sample(1, 8, steps=5, top_k=3)
    with pytest.raises(ValueError, match='length=17'):
        m.sample(1, 17, steps=5)
    with pytest.raises(ValueError, match='cfg_drop'):
        m.sample(1, 8, steps=5, guidance_scale=3.0)


# ---------------------------------------------------------------- the bound on a toy distribution

TOY_SEQS = torch.tensor([[1, 2, 3, 4], [4, 3, 2, 1], [2, 2, 5, 5], [6, 1, 6, 1]])
TOY_ENTROPY = 2.0 / 4  # uniform over 4 sequences of 4 tokens: 0.5 bits per token


def toy_bound(model, n=512, seed=0):
    """Mean bound (bits/token) over n draws of the toy distribution and its standard error."""
    g = torch.Generator().manual_seed(seed)
    rows = TOY_SEQS[torch.randint(0, 4, (n,), generator=g)]
    est = torch.cat([model.nll(rows[i:i + 128], generator=g) for i in range(0, n, 128)])
    return est.mean().item(), est.std().item() / math.sqrt(n)


def toy_model(model_type, steps, **kw):
    m = build_model(ModelConfig(model_type=model_type, vocab_size=8, block_size=4, n_layer=2, n_head=2, n_embd=32,
                                T=100, embed_dim=8, **kw))
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    opt = configure_optimizer(m, 0.0, 3e-3, (0.9, 0.99), 'cpu')
    for _ in range(steps):
        rows = TOY_SEQS[torch.randint(0, 4, (64,), generator=g)]
        if m.extra_tokens:  # ar reads a leading <|endoftext|> (the last id) before each sequence
            rows = torch.cat([torch.full((64, 1), 7), rows], 1)
        loss = m(rows)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def test_embed_bound_is_not_below_the_entropy():
    m = toy_model('embed', 300)
    bound, se = toy_bound(m)
    assert bound >= TOY_ENTROPY - 3 * se, (bound, se)
    assert bound < 50  # and training made it a usable number, not a blown-up one
