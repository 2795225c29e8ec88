"""Backbone and the `embed` family (Diffusion-LM), checked against closed forms (the Gaussian process itself: test_diffusion.py)."""
import math

import pytest
import torch

from conftest import best_match, compact_vocab, train_steps
from diffusion import ids_to_bits
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
    from model import GaussianLM
    torch.manual_seed(0)
    for B in (3, 4):
        n, counts = 4000, torch.zeros(B)
        for _ in range(n):
            rows, keep = GaussianLM.self_cond_rows(B, 'cpu')
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
