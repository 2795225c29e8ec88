"""Tests of model.py: the backbone, then the families, each checked against closed forms (the logits that carry the
exact likelihood of the noisy state, the bounds rebuilt term by term and against the full sum over t), its bound
against a toy distribution's entropy, memorised real text sampled back (prompts and infilling included), and
torch.compile's view of every family's steps (one graph each). The processes themselves: test_diffusion.py."""
import math

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from conftest import best_match, compact_vocab, prompted, train_steps
from diffusion import NUM_BITS, abar_schedule, ids_to_bits, rand, randn, valid_codes
from model import (MODEL_TYPES, EmbedDiffusion, ModelConfig, TimestepEmbedder, apply_rotary, build_model,
                   rotary_tables)
from train import configure_optimizer

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


@pytest.mark.parametrize('model_type, kw', [('embed', {'cfg_drop': 0.5}), ('analog', {})])
@pytest.mark.parametrize('B', [6, 5])
def test_self_conditioning_first_pass_runs_on_the_self_conditioned_half_only(model_type, kw, B, monkeypatch):
    """Training's gradient-free first pass sees only the sequences that are self-conditioned (B // 2; an odd batch
    one more, whose estimate is kept on a coin), with their prompt condition, and the second pass gets its estimate
    on exactly those rows (zeros elsewhere), without a gradient path through it."""
    m = tiny(model_type, **kw)
    m.train()
    calls, original = [], type(m).x0_estimate

    def recording(self, x_t, t, x0_sc, cond=None):
        out = original(self, x_t, t, x0_sc, cond)
        calls.append((x_t.detach().clone(), t.clone(), x0_sc, cond, out[0].detach().clone()))
        return out
    monkeypatch.setattr(type(m), 'x0_estimate', recording)
    m(torch.randint(0, 100, (B, 16)))
    (x_first, t_first, sc_first, cond_first, out_first), (x_second, t_second, sc_second, cond_second, _) = calls
    k = (B + 1) // 2
    assert x_first.shape[0] == k and torch.equal(sc_first, torch.zeros_like(sc_first))
    rows = [next(j for j in range(B) if torch.equal(x_second[j], x_first[i])) for i in range(k)]
    assert len(set(rows)) == k and torch.equal(t_first, t_second[rows])
    if cond_second is not None:
        assert torch.equal(cond_first, cond_second[rows])
    assert torch.equal(sc_second[rows[:B // 2]], out_first[:B // 2]) and not sc_second.requires_grad
    if B % 2:  # the odd row keeps its estimate or gets zeros
        last = sc_second[rows[-1]]
        assert torch.equal(last, out_first[-1]) or torch.equal(last, torch.zeros_like(last))
    others = [j for j in range(B) if j not in rows]
    assert torch.equal(sc_second[others], torch.zeros_like(sc_second[others]))
    if B % 2:  # and over draws it does both (all 24 alike: probability 2^-23)
        kept = set()
        for _ in range(24):
            calls.clear()
            m(torch.randint(0, 100, (B, 16)))
            (_, _, _, _, out_first), (x_second, _, _, _, _), sc_second = calls[0], calls[1], calls[1][2]
            row = next(j for j in range(B) if torch.equal(x_second[j], calls[0][0][-1]))
            kept.add(bool(torch.equal(sc_second[row], out_first[-1])))
        assert kept == {True, False}


def test_self_conditioned_rows_are_each_chosen_half_the_time_for_odd_batches_too():
    torch.manual_seed(0)
    for B in (3, 4):
        n, counts = 4000, torch.zeros(B)
        for _ in range(n):
            rows, keep = EmbedDiffusion.self_cond_rows(B, 'cpu')
            counts[rows] += keep
        freq = counts / n  # each ~ Binomial(n, 1/2) / n: standard error 0.0079
        assert (freq - 0.5).abs().max() < 0.04, (B, freq)


# ---------------------------------------------------------------- embed: memorise real text, sample it back

@pytest.fixture(scope='module')
def overfit_embed(story_batch):
    batch, K, _ = compact_vocab(story_batch(4, 24))
    torch.manual_seed(0)  # the initial weights too: the samples below are measured at this seed
    m = build_model(ModelConfig(model_type='embed', vocab_size=K, block_size=24, n_layer=2, n_head=2, n_embd=64,
                                T=100, embed_dim=16))
    first, last = train_steps(m, batch, 600)
    return m, batch, first, last


@pytest.mark.slow
def test_embed_overfits_real_text(overfit_embed):
    m, batch, first, last = overfit_embed
    assert last < first / 5, (first, last)


@pytest.mark.slow
@pytest.mark.parametrize('sampler,steps', [('ddpm', 100), ('ddim', 25)])
def test_embed_samplers_reproduce_memorised_text(overfit_embed, sampler, steps):
    m, batch, _, _ = overfit_embed
    out = m.sample(32, 24, steps=steps, generator=torch.Generator().manual_seed(0), sampler=sampler, eta=0.0,
                   clamp=False)
    assert m.nfe == steps + 1  # self-conditioning: a second pass at the first step only
    # the x0 estimate is a posterior mean, so while the noise still hides which memorised row a sample follows
    # it sits between rows, and some positions then settle on another row's token: most, not all, come back (0.61
    # and 0.64 of a row here; unseeded initial weights gave 0.52-0.61 over five seeds; chance level is 1/K ~ 0.02)
    assert best_match(out, batch).mean() > 0.5


@pytest.mark.slow
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
    opts = m.check_sample_args(16, 5, {'guidance_scale': w, 'clamp': False})  # clamping would hide x0_hat's formula
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


@pytest.mark.slow
def test_embed_bound_is_not_below_the_entropy():
    m = toy_model('embed', 300)
    bound, se = toy_bound(m)
    assert bound >= TOY_ENTROPY - 3 * se, (bound, se)
    assert bound < 50  # and training made it a usable number, not a blown-up one


def test_rounding_loss_scores_each_distinct_id_once_and_equals_the_loss_over_every_position():
    """embed's rounding loss, -log p(w | c_w) averaged over positions, is computed once per distinct id weighted by its
    count: the value and the gradient must be those of the plain mean over all positions."""
    torch.manual_seed(0)
    m = build_model(ModelConfig(model_type='embed', vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16,
                                embed_dim=4))
    idx = torch.tensor([[3, 3, 3, 5, 0, 3, 10, 5], [5, 1, 1, 3, 3, 3, 3, 2]])  # repeats with different counts
    got = m.rounding_loss(idx)
    (g_got,) = torch.autograd.grad(got, m.tok_emb.weight)
    table = m.table()
    logits = -((table[idx][..., None, :] - table) ** 2).sum(-1)  # -||c_w - c_v||^2 for every position and v
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten())
    (g_want,) = torch.autograd.grad(want, m.tok_emb.weight)
    assert torch.allclose(got, want, atol=1e-5), (got, want)
    assert torch.allclose(g_got, g_want, atol=1e-5)


# ---------------------------------------------------------------- the Gaussian and bit bounds, term by term

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
            logp = model.id_logits(b_1, one).double().log_softmax(-1)  # bits' decoder: its logits at t = 1
        else:
            x0 = model.clean(rows)
            d = model.process
            total = d.prior_kl(x0.double()).sum((1, 2))
            for t in range(2, T + 1):
                t_batch = torch.full((B,), t)
                if model.config.continuous_time:  # the integral over the cell (t - 1, t]: one uniform point in it
                    t_batch = t - rand((B,), g, 'cpu')
                x_t = d.q_sample(x0, t_batch, randn(x0.shape, g, 'cpu').float())
                total += d.step_kl(x0, model.denoise(x_t, t_batch)[0], t_batch).sum((1, 2))
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


# ---------------------------------------------------------------- analog and bits

V = 50257


def test_marginals_of_the_categorical_head_are_sums_over_ids():
    """P(b_0,k = 1) = sum_w p(w) bit_k(w), checked by brute force over a vocabulary of 300 ids."""
    m = build_model(ModelConfig(model_type='bits', vocab_size=300, block_size=4, n_layer=1, n_head=2, n_embd=16, T=10))
    logits = torch.randn(2, 300, dtype=torch.float64) * 3
    p = logits.softmax(-1)
    nb = m.num_bits
    assert nb == 9  # as many bits as 300 ids need
    brute = torch.stack([sum(p[:, w] * ((w >> (nb - 1 - k)) & 1) for w in range(300)) for k in range(nb)], -1)
    assert torch.allclose(m.marginals(logits, torch.float64), brute, atol=1e-12)
    assert torch.equal(valid_codes(300), ids_to_bits(torch.arange(300), 9).float())


def test_bit_logits_add_the_exact_flip_likelihood_at_every_t():
    """With the network's head silenced, p(w | b_t) must be the exact posterior of a uniform prior over the ids,
    prod_k q(b_t,k | bit_k(w)) normalised, q = stay_t = (1 + abar_t) / 2 where the bit agrees, 1 - stay_t else."""
    m = build_model(ModelConfig(model_type='bits', vocab_size=300, block_size=4, n_layer=1, n_head=2, n_embd=16, T=10))
    with torch.no_grad():
        m.lm_head.weight.zero_()
    t = torch.tensor([1, 4, 9])
    nb = m.num_bits
    b_t = (torch.rand(3, 2, nb) < 0.5).float()
    got = m.id_logits(b_t, t).double().log_softmax(-1)
    for i in range(3):
        stay = (1 + m.abar[t[i]].item()) / 2
        lik = torch.tensor([[sum(math.log(stay if b_t[i, j, k] == ((w >> (nb - 1 - k)) & 1) else 1 - stay)
                                 for k in range(nb)) for w in range(300)] for j in range(2)], dtype=torch.float64)
        assert torch.allclose(got[i], lik.log_softmax(-1), atol=1e-4)


def test_bit_input_embeds_the_whole_code_as_an_id():
    """Where no bit flipped, BitCodeInput's lookup is the row of the token id itself (a token embedding)."""
    m = build_model(ModelConfig(model_type='bits', vocab_size=V, block_size=4, n_layer=1, n_head=2, n_embd=16, T=10))
    with torch.no_grad():
        m.bit_input.proj.weight.zero_()
        m.bit_input.proj.bias.zero_()
        m.bit_input.code_emb.weight.copy_(torch.arange(2 ** NUM_BITS).float()[:, None].expand(-1, 16))
    ids = torch.tensor([[0, 1, 2 ** 15, 50256]])
    out = m.bit_input(2 * ids_to_bits(ids).float() - 1)
    assert torch.equal(out[..., 0], ids.float())


def bits_model(**kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(model_type='bits', vocab_size=V, block_size=8, n_layer=1, n_head=2, n_embd=32,
                                   T=100, **kw))


@pytest.fixture(scope='module')
def real_text(story_batch):
    """Real text, renumbered densely (K ids): the categorical head stays small, and the ids' codes still differ
    in several low bits, so the sampler must get every one of them right."""
    batch, K, _ = compact_vocab(story_batch(4, 32))
    return batch, K


@pytest.fixture(scope='module')
def overfit(real_text):
    """overfit(model_type): a model of the family trained to memorise the real text (one per module), and its first
    and last training losses."""
    batch, K = real_text
    models = {}

    def get(model_type):
        if model_type not in models:
            torch.manual_seed(0)
            m = build_model(ModelConfig(model_type=model_type, vocab_size=K, block_size=32, n_layer=2, n_head=2,
                                        n_embd=64, T=100))
            first, last = train_steps(m, batch, 800)
            models[model_type] = m, first, last
        return models[model_type]
    return get


@pytest.mark.slow
@pytest.mark.parametrize('model_type,steps', [('bits', {100: 0.45, 10: 0.35}), ('analog', {100: 0.6, 20: 0.6})])
def test_overfit_on_real_text_and_sample_it_back(real_text, overfit, model_type, steps):
    """Samples give back much of the memorised text (chance is 1/K ~ 0.015 per position). Deterministic DDIM
    with few steps reproduces less than the full chain, so it gets a lower bar; the bits sampler redraws a clean
    id at every step (an exact ancestral step of the mixture), so where the model is still unsure which memorised
    row a position follows, it can settle on another row's token: a lower bar again. (analog at 100 steps matched
    0.68 of a row at this seed once its logits carried the exact likelihood of x_t, 0.8 before: the posterior
    mean then mixes memorised rows at mid noise, as embed's does.)"""
    batch, K = real_text
    m, first, last = overfit(model_type)
    assert last < first / 3, (first, last)
    for s, bar in steps.items():
        out = m.sample(8, 32, steps=s, generator=torch.Generator().manual_seed(s))
        assert best_match(out, batch).mean() > bar, (s, best_match(out, batch))
    assert m.nll(batch).mean() < 2.0  # bits/token of memorised text, far below log2(K)


@pytest.mark.slow
@pytest.mark.parametrize('model_type', ['bits', 'analog'])
def test_fixed_tokens_choose_the_memorised_row(real_text, overfit, model_type):
    """With every other token of a memorised row fixed, the free ones follow that row: imputation conditions the
    whole chain, not only the output (where the sampler pastes the fixed tokens anyway). Without it, each sample
    would follow the row the model drifts to: about 4 of 16. (Imputation is a weak condition for the Gaussian
    family: with a prefix of 8 and a suffix of 4 of 32 tokens fixed, analog follows the prompted row at chance.)
    Chance is 4 +- 1.7 of 16. analog, since its logits carry the likelihood of x_t, follows its row in 8 (2
    threads) to 10 (1 thread) of 16: its bar is 8 (chance reaches it with p ~ 0.03). bits, on the 7-bit code these
    68 ids need, follows it in 14-19 of 32 samples over four seeds (19 at this one; chance 8 +- 2.4): its bar is 13
    of 32 (chance reaches it with p ~ 0.02)."""
    batch, K = real_text
    m, _, _ = overfit(model_type)
    per_row, bar = {'bits': (8, 13), 'analog': (4, 8)}[model_type]
    agree, best, prompted_row = prompted(m, batch, torch.arange(32) % 2 == 0, per_row=per_row, steps=100)
    assert sum(b == r for b, r in zip(best, prompted_row)) >= bar, (best, agree)


@pytest.mark.slow
@pytest.mark.parametrize('model_type', ['bits', 'analog'])
def test_bound_is_not_below_the_entropy(model_type):
    m = toy_model(model_type, 400)
    bound, se = toy_bound(m)
    assert bound >= TOY_ENTROPY - 3 * se, (bound, se)
    # a usable number: bits is near the 3 bits/token of a uniform guess after this little training; the
    # Gaussian bound of analog pays for every imprecision of x0 at high signal-to-noise ratio, so it is looser
    assert bound < (8 if model_type == 'bits' else 50)


def test_analog_td_steps_further_than_the_grid():
    """Asymmetric time intervals (td): a DDIM step from grid time t to s lands at s' = s - td (t - s), i.e.
    x_s' = sqrt(abar_s') x0_hat + sqrt(1 - abar_s') eps_hat, eps_hat = (x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t),
    and never below 0 (the last step, s = 0, lands on x0_hat itself)."""
    torch.manual_seed(0)
    m = build_model(ModelConfig(model_type='analog', vocab_size=300, block_size=8, n_layer=1, n_head=2, n_embd=32,
                                T=100)).eval()
    fixed = torch.full((2, 8), -1)
    opts = m.check_sample_args(8, 4, {'td': 0.4})
    state = m.init_state(2, 8, fixed, torch.Generator().manual_seed(0), opts)
    for t, s, s_td in [(100, 75, 65), (25, 0, 0)]:
        new = m.step(state, t, s, fixed, torch.Generator().manual_seed(1), opts)
        x, x0 = state['x'].double(), new['x0_hat'].double()
        a_t, a_s = m.abar[t].item(), m.abar[s_td].item()
        eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        assert torch.allclose(new['x'].double(), math.sqrt(a_s) * x0 + math.sqrt(1 - a_s) * eps, atol=1e-4)
        state = new


@pytest.mark.slow
def test_exact_posterior_sampler_accepts_any_number_of_steps():
    m = bits_model().eval()
    for steps in (1, 2, 37, 100):
        m.sample(2, 8, steps=steps, generator=torch.Generator().manual_seed(0))
        assert m.nfe == steps
    with pytest.raises(ValueError, match='steps=101'):
        m.sample(2, 8, steps=101)


def test_step_kl_is_unbiased_and_tighter_than_one_draw():
    """KL(q(b_{t-1} | b_t, b_0) || p(b_{t-1} | b_t)) by brute force over all 2^4 codes of b_{t-1}: step_kl's mean
    over many draws must match it within 3 standard errors, at a t (of T = 20) where q often leaves its mode and the
    one-flip neighbours (so the drawn remainder matters). At T = 1000 q barely leaves them, and the estimate must
    be far steadier than a plain one-draw log q(b) - log p(b)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[3, 7, 11]])
    b0 = ids_to_bits(ids, 4).double()

    def bits_model(T):
        m = build_model(ModelConfig(model_type='bits', vocab_size=12, block_size=3, n_layer=1, n_head=2, n_embd=16, T=T))
        with torch.no_grad():
            m.lm_head.weight.normal_(0, 0.3, generator=g)
        return m

    m, t = bits_model(20), torch.tensor([3])
    b_t = m.process.q_sample(b0, t, g)
    while (b_t != b0).sum() < 4:  # several flipped bits: q(b_{t-1}) is spread beyond the mode's neighbours
        b_t = m.process.q_sample(b0, t, g)
    with torch.no_grad():
        logits = m.id_logits(b_t, t).double()
    q1 = m.process.posterior_prob_one(b_t, b0, t, t - 1)[0]                   # (3, 4): 12 ids need 4 bits
    every = ids_to_bits(torch.arange(2 ** m.num_bits), m.num_bits).double()  # (16, 4)
    n = len(every)
    exact, outside = 0.0, 0.0
    for j in range(3):
        q = torch.where(every > 0.5, q1[j], 1 - q1[j]).prod(-1)
        log_p = m.process.transition_logprob(every, b_t[0, j].expand_as(every), logits[0, j].expand(n, -1), m.codes,
                                             t.expand(n), t.expand(n) - 1)
        exact += (q * (q.log() - log_p)).sum().item()
        outside += q[(every != (q1[j] > 0.5).double()).sum(-1) > 1].sum().item() / 3
    assert outside > 0.02  # the drawn remainder carries real mass here
    near = torch.stack([m.process.step_kl(b0, b_t, logits, m.codes, t, g).sum() for _ in range(400)])
    se = near.std().item() / math.sqrt(len(near))
    assert abs(near.mean().item() - exact) < 3 * se, (near.mean(), exact, se)

    m, t = bits_model(1000), torch.tensor([100])
    b_t = m.process.q_sample(b0, t, g)
    with torch.no_grad():
        logits = m.id_logits(b_t, t).double()
    near = torch.stack([m.process.step_kl(b0, b_t, logits, m.codes, t, g).sum() for _ in range(200)])
    plain = torch.stack([m.process.step_kl(b0, b_t, logits, m.codes, t, g, near=False).sum() for _ in range(200)])
    assert abs(near.mean() - plain.mean()) < 3 * plain.std() / math.sqrt(len(plain))
    assert near.std() < 0.1 * plain.std(), (near.std(), plain.std())


# ---------------------------------------------------------------- ar

def trained_ar():
    m = tiny('ar')
    train_steps(m, torch.randint(0, 100, (8, 17)), 20, lr=1e-2)
    return m.eval()


def test_ar_is_causal():
    m = trained_ar()
    idx = torch.randint(0, 100, (1, 16))
    changed = idx.clone()
    changed[0, 9] = (idx[0, 9] + 1) % 100
    a, b = m.logits(idx), m.logits(changed)
    assert torch.allclose(a[:, :9], b[:, :9], atol=1e-6)      # positions before j do not see token j
    assert not torch.allclose(a[:, 9:], b[:, 9:], atol=1e-4)  # positions from j on do


def test_kv_cache_greedy_decoding_equals_recomputing_everything():
    m = trained_ar()
    prompt = torch.tensor([[5, 17, 3]])
    fixed = torch.full((2, 16), -1)
    fixed[:, :3] = prompt
    cached = m.sample(2, 16, fixed=fixed, temperature=0.0)
    seq = torch.cat([torch.full((2, 1), m.bos_id), prompt.expand(2, 3)], 1)
    with torch.no_grad():
        while seq.shape[1] < 17:
            seq = torch.cat([seq, m.logits(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(cached, seq[:, 1:])
    assert m.nfe == 13


def test_ar_nll_equals_direct_computation():
    m = trained_ar()
    idx = torch.randint(0, 100, (3, 17))
    direct = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for j in range(16):  # one position at a time, from the prefix alone
            logp = m.logits(idx[:, :j + 1])[:, -1].double().log_softmax(-1)
            direct -= logp.gather(1, idx[:, j + 1:j + 2]).squeeze(1)
    assert torch.allclose(m.nll(idx), direct / 16 / math.log(2), atol=1e-5)


def test_ar_rejects_infilling_and_steps():
    m = tiny('ar').eval()
    fixed = torch.full((1, 16), -1)
    fixed[0, 5] = 3
    with pytest.raises(ValueError, match='prefix prompts only'):
        m.sample(1, 16, fixed=fixed)
    with pytest.raises(ValueError, match='steps'):
        m.sample(1, 16, steps=10)


def test_ar_top_k_one_is_greedy_and_top_p_keeps_the_head():
    m = trained_ar()
    greedy = m.sample(2, 16, temperature=0.0)
    assert torch.equal(m.sample(2, 16, top_k=1, generator=torch.Generator().manual_seed(3)), greedy)
    assert torch.equal(m.sample(2, 16, top_p=1e-9, generator=torch.Generator().manual_seed(4)), greedy)


# ---------------------------------------------------------------- mask

@pytest.mark.parametrize('order', ['random', 'confidence'])
def test_mask_sampler_keeps_revealed_tokens_and_ends_unmasked(order):
    m = tiny('mask').eval()
    train_steps(m, torch.randint(0, 100, (8, 16)), 5, lr=1e-2)
    states = []
    step = m.step
    m.step = lambda *a: states.append(step(*a)) or states[-1]
    fixed = torch.full((1, 16), -1)
    fixed[0, [0, 7, 15]] = torch.tensor([1, 2, 3])
    out = m.sample(4, 16, steps=10, fixed=fixed, generator=torch.Generator().manual_seed(0), order=order)
    prev = torch.where(fixed >= 0, fixed, m.mask_id).expand(4, 16)
    for st in states:
        z = st['z']
        revealed = prev != m.mask_id
        assert torch.equal(z[revealed], prev[revealed])  # nothing once revealed ever changes
        assert (z != m.mask_id).sum() >= revealed.sum()
        prev = z
    assert (prev != m.mask_id).all() and torch.equal(prev, out)
    assert (out[:, [0, 7, 15]] == torch.tensor([1, 2, 3])).all()
    assert (out < 100).all()  # SUBS: never [MASK] nor a padding id


def test_mask_confidence_order_reveals_the_most_probable_draws_first():
    """order='confidence' with argmax draws and as many steps as positions (loglinear: one reveal per step): each
    step reveals, in every row, the one masked position whose most probable token is the most probable of the row,
    and fills it with that token."""
    m = tiny('mask').eval()
    train_steps(m, torch.randint(0, 100, (8, 16)), 5, lr=1e-2)
    calls = []
    step = m.step
    m.step = lambda state, *a: calls.append((state, step(state, *a))) or calls[-1][1]
    m.sample(3, 16, steps=16, generator=torch.Generator().manual_seed(0), order='confidence', temperature=0.0)
    assert len(calls) == 16
    for before, after in calls:
        new = (before['z'] == m.mask_id) & (after['z'] != m.mask_id)
        assert (new.sum(1) == 1).all()  # 16 s still masked after each step t -> s
        best = after['logp'].max(-1)  # the logits the step read
        conf = torch.where(before['z'] == m.mask_id, best.values, -math.inf)
        assert torch.equal(new.float().argmax(1), conf.argmax(1))
        assert torch.equal(after['z'][new], best.indices[new])


def masked_counts_per_step(m, n, steps, order):
    """[(s, number of positions still masked in each row after the step t -> s)] of one sample() call."""
    counts, step = [], m.step
    m.step = lambda state, t, s, *a: counts.append((s, ((r := step(state, t, s, *a))['z'] == m.mask_id).sum(1))) or r
    m.sample(n, 16, steps=steps, generator=torch.Generator().manual_seed(0), order=order)
    del m.step
    return counts


@pytest.mark.slow
def test_mask_confidence_order_reveals_as_many_as_the_ancestral_sampler_at_many_steps():
    """With more steps than twice the length (L = 16, 64 steps) the expected reveal per step is below 1/2. The
    confidence order still follows the ancestral (random-order) sampler's expected count at every step, 16 s still
    masked at time s (loglinear), instead of revealing nothing until the last step and then everything at once."""
    m = tiny('mask').eval()
    ancestral = masked_counts_per_step(m, 256, 64, 'random')
    at_half = next(c for s, c in ancestral if abs(s - 0.5) < 1e-9).double()
    assert abs(at_half.mean() - 8) < 4 * at_half.std() / 16  # the ancestral sampler's expectation, 16 x 0.5
    confidence = masked_counts_per_step(m, 4, 64, 'confidence')
    assert len(confidence) == 64
    for s, masked in confidence:
        assert ((masked - 16 * s).abs() <= 0.5 + 1e-9).all(), (s, masked)  # at most 1/2 from the expectation
    assert (next(c for s, c in confidence if abs(s - 0.5) < 1e-9) == 8).all()
    assert (confidence[-2][1] <= 1).all()  # no big final jump: at most one position left for the last step


@pytest.mark.parametrize('time_cond', [False, True])
def test_mask_bound_of_a_uniform_predictor_is_exactly_L_log2_V(time_cond, monkeypatch):
    """A network that spreads every masked position evenly over V ids has -log2 p(w) = L log2 V, and every term of
    the ELBO is the same, so the bound is tight and each draw of it, whatever m and subset it drew, sums to exactly
    L log2 V over the sequence: the weight L / m times m masked positions of log2 V each."""
    m = tiny('mask', time_cond=time_cond).eval()
    V = 100
    monkeypatch.setattr(m, 'log_probs', lambda z, t: torch.full((*z.shape, V), -math.log(V)))
    x = torch.randint(0, V, (64, 16))
    per_row = m.position_nll(x, generator=torch.Generator().manual_seed(0)).sum(1)
    assert torch.allclose(per_row, torch.full((64,), 16 * math.log2(V), dtype=torch.float64), rtol=1e-6)


def test_mask_rejects_an_unknown_order():
    with pytest.raises(ValueError, match="order='lowest'"):
        tiny('mask').sample(1, 16, steps=4, order='lowest')


def test_mask_never_predicts_mask_or_padding():
    m = tiny('mask')
    assert m.log_probs(torch.full((1, 16), m.mask_id), None).shape[-1] == 100  # only the real vocabulary


def test_mask_cached_sampler_matches_uncached_with_fewer_evaluations():
    m = tiny('mask').eval()
    a = m.sample(2, 16, steps=200, generator=torch.Generator().manual_seed(0), cached=True)
    nfe_cached = m.nfe
    b = m.sample(2, 16, steps=200, generator=torch.Generator().manual_seed(0), cached=False)
    assert torch.equal(a, b)
    assert m.nfe == 200 and nfe_cached <= 32  # at most one evaluation per revealed token (2 x 16), plus none


def test_mask_time_conditioned_sampler_does_not_cache():
    m = tiny('mask', time_cond=True).eval()
    m.sample(1, 16, steps=50, generator=torch.Generator().manual_seed(0))
    assert m.nfe == 50


@pytest.mark.slow
@pytest.mark.parametrize('schedule,time_cond', [('loglinear', False), ('cosine', False), ('cosine', True)])
def test_mask_elbo_estimators_agree(schedule, time_cond):
    """nll() and forward() integrate t out analytically (subset-size form). MDLM's own estimator, written here
    from the schedule: t ~ U[eps, 1], mask each token with probability 1 - alpha_t, weight -alpha'_t / (1 - alpha_t).
    Both estimate the same continuous-time ELBO, so their means agree within the Monte Carlo error (with a
    time-conditioned network too, which nll() feeds the t drawn from its posterior given the mask count)."""
    m = tiny('mask', vocab_size=8, mask_schedule=schedule, time_cond=time_cond)
    train_steps(m, TOY_SEQS.repeat(1, 4), 30, lr=1e-2)
    if time_cond:  # a network that leans on t, so that a wrong t shows (training learns to read the mask count)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith('weight') and ('adaLN_modulation' in name or 't_embedder' in name):
                    p.normal_(0.0, 0.5 if 'adaLN' in name else 0.3, generator=g)
    rows = TOY_SEQS.repeat(64, 4)
    B, L = rows.shape
    g = torch.Generator().manual_seed(0)
    draws = []
    with torch.no_grad():
        for _ in range(200):
            t = 1e-3 + (1 - 1e-3) * torch.rand(B, generator=g, dtype=torch.float64)
            alpha = m.schedule.alpha(t)
            weight = 1 / t if schedule == 'loglinear' else (math.pi / 2) * torch.sin(math.pi / 2 * t) / (1 - alpha)
            masked = torch.rand(B, L, generator=g, dtype=torch.float64) < (1 - alpha)[:, None]
            z = torch.where(masked, m.mask_id, rows)
            nll = -m.log_probs(z, t.float() if time_cond else None).gather(-1, rows.unsqueeze(-1)).squeeze(-1)
            draws.append((weight[:, None] * nll.double() * masked).sum(1) / L / math.log(2))
    t_form = torch.cat(draws)
    sub = torch.cat([m.nll(rows, torch.Generator().manual_seed(i)) for i in range(20)])
    with torch.no_grad():
        train_form = torch.stack([m(rows) for _ in range(50)]).double() / math.log(2)
    se = math.sqrt(t_form.var() / len(t_form) + sub.var() / len(sub))
    assert abs(t_form.mean() - sub.mean()) < 4 * se + 0.01, (t_form.mean(), sub.mean(), se)
    assert abs(train_form.mean() - sub.mean()) < 4 * se + 0.01, (train_form.mean(), sub.mean(), se)


@pytest.mark.parametrize('schedule', ['loglinear', 'cosine'])
def test_mask_time_given_count_is_the_exact_posterior(schedule):
    """The t a time-conditioned network sees in nll() must be drawn from the posterior given m of L masked: the
    ELBO's dt weight is d pi / pi in the mask rate pi = 1 - alpha_t, the likelihood of the count C(L, m) pi^m
    (1 - pi)^(L - m), so the density of pi is proportional to pi^(m-1) (1 - pi)^(L-m). Its mean and variance,
    by quadrature here, against those of the drawn rates, per m (an off-by-one or swapped Beta is many SEs off)."""
    m = tiny('mask', mask_schedule=schedule, time_cond=True)
    L = 16
    _, masked, count, t = m.masked_subset(torch.zeros(160_000, L, dtype=torch.long), torch.Generator().manual_seed(0),
                                          stratified=False)
    assert torch.equal(masked.sum(1), count)
    rate = 1 - m.schedule.alpha(t.double())
    pi = (torch.arange(200_000, dtype=torch.float64) + 0.5) / 200_000  # midpoint rule on (0, 1)
    for k in range(1, L + 1):
        u = rate[count == k]
        assert len(u) > 8000
        density = pi ** (k - 1) * (1 - pi) ** (L - k)
        mean = (pi * density).sum() / density.sum()
        var = ((pi - mean) ** 2 * density).sum() / density.sum()
        se_mean, se_var = (var / len(u)).sqrt(), ((u - mean) ** 2).std() / math.sqrt(len(u))
        assert abs(u.mean() - mean) < 5 * se_mean, (k, u.mean(), mean, se_mean)
        assert abs(u.var() - var) < 5 * se_var, (k, u.var(), var, se_var)


@pytest.mark.slow
def test_mask_elbo_is_not_below_entropy_and_ar_nll_approaches_it():
    mask = toy_model('mask', 400)
    bound, se = toy_bound(mask)
    assert TOY_ENTROPY - 3 * se <= bound < 1.5, (bound, se)
    ar = toy_model('ar', 300)
    rows = torch.cat([torch.full((4, 1), 7), TOY_SEQS], 1)
    exact = ar.nll(rows).mean().item()
    assert exact >= TOY_ENTROPY - 1e-3  # an exact NLL of the true distribution cannot beat its entropy ...
    assert exact < TOY_ENTROPY + 0.05   # ... and a trained model gets close to it


@pytest.fixture(scope='module')
def short_text(story_batch):
    batch, K, _ = compact_vocab(story_batch(4, 25))
    return batch, K


@pytest.fixture(scope='module')
def overfit_mask(short_text):
    batch, K = short_text
    torch.manual_seed(0)
    m = build_model(ModelConfig(model_type='mask', vocab_size=K, block_size=24, n_layer=2, n_head=2, n_embd=64))
    first, last = train_steps(m, batch[:, :24], 600)
    return m, first, last


@pytest.mark.slow
def test_mask_overfits_real_text_and_samples_it_back(short_text, overfit_mask):
    batch, K = short_text
    m, first, last = overfit_mask
    assert last < first / 5, (first, last)
    out = m.sample(8, 24, steps=24, generator=torch.Generator().manual_seed(0))
    assert best_match(out, batch[:, :24]).mean() > 0.8


@pytest.mark.slow
def test_mask_prompt_chooses_the_memorised_row(short_text, overfit_mask):
    """The first 8 and last 4 tokens of a memorised row (the rows share their first 6) make the free ones follow
    that row: the fixed tokens are in the network's input from the first step, not only pasted over the output.
    Without them each sample would follow the row the model drifts to: about 4 of 16."""
    batch, K = short_text
    m, _, _ = overfit_mask
    pos = torch.arange(24)
    agree, best, prompted_row = prompted(m, batch[:, :24], (pos < 8) | (pos >= 20), per_row=4, steps=24)
    assert best == prompted_row and agree > 0.9, (best, agree)


@pytest.mark.slow
def test_ar_overfits_real_text_and_generates_it_back(short_text):
    batch, K = short_text  # each row starts with <|endoftext|>, renumbered; make it the model's BOS (last id)
    eot = batch[0, 0].item()
    swap = torch.arange(K)
    swap[eot], swap[K - 1] = K - 1, eot
    batch = swap[batch]
    m = build_model(ModelConfig(model_type='ar', vocab_size=K, block_size=24, n_layer=2, n_head=2, n_embd=64))
    first, last = train_steps(m, batch, 300)
    assert last < first / 10, (first, last)
    out = m.sample(8, 24, generator=torch.Generator().manual_seed(0))
    assert best_match(out, batch[:, 1:]).mean() > 0.9


# ---------------------------------------------------------------- torch.compile: every family's steps whole
# (the `eager` backend runs Dynamo's tracing, where breaks and recompilations happen, without Inductor's code
# generation, so this stays quick on CPU; a graph break added to any forward fails here)

@pytest.mark.slow
@pytest.mark.parametrize('model_type,kw', [(t, {}) for t in MODEL_TYPES] + [('mask', {'time_cond': True}),
                                            ('embed', {'predict': 'eps', 'cfg_drop': 0.1}),
                                            ('embed', {'continuous_time': True}), ('bits', {'continuous_time': True})])
def test_training_and_evaluation_steps_compile_whole(model_type, kw):
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    m = build_model(ModelConfig(model_type=model_type, vocab_size=300, block_size=16, n_layer=1, n_head=2,
                                n_embd=32, T=20, embed_dim=8, **kw))
    compiled = torch.compile(m, backend='eager')
    x = torch.randint(0, 300, (4, 16 + m.extra_tokens))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m.train()
    for _ in range(3):  # new random times, masks and noise every step: none of them may re-trigger tracing
        loss = compiled(x)
        loss.backward()
        opt.step()
        opt.zero_grad()
    m.eval()
    with torch.no_grad():
        for _ in range(2):
            compiled(x)
    breaks = dict(counters['graph_break'])
    assert not breaks, f"graph breaks: {breaks}"
    assert counters['stats']['unique_graphs'] <= 2, dict(counters['stats'])  # one for train, one for eval
