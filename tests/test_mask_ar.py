"""The `mask` family (masked diffusion, MDLM) and the `ar` baseline (autoregressive)."""
import math

import pytest
import torch

from conftest import best_match, compact_vocab, prompted, train_steps
from model import ModelConfig, build_model
from test_model import TOY_ENTROPY, TOY_SEQS, toy_bound, toy_model


def tiny(model_type, vocab=100, **kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(model_type=model_type, vocab_size=vocab, block_size=16, n_layer=2, n_head=2,
                                   n_embd=32, **kw))


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
    m = tiny('mask', vocab=8, mask_schedule=schedule, time_cond=time_cond)
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
def real_text(story_batch):
    batch, K, _ = compact_vocab(story_batch(4, 25))
    return batch, K


@pytest.fixture(scope='module')
def overfit_mask(real_text):
    batch, K = real_text
    torch.manual_seed(0)
    m = build_model(ModelConfig(model_type='mask', vocab_size=K, block_size=24, n_layer=2, n_head=2, n_embd=64))
    first, last = train_steps(m, batch[:, :24], 600)
    return m, first, last


@pytest.mark.slow
def test_mask_overfits_real_text_and_samples_it_back(real_text, overfit_mask):
    batch, K = real_text
    m, first, last = overfit_mask
    assert last < first / 5, (first, last)
    out = m.sample(8, 24, steps=24, generator=torch.Generator().manual_seed(0))
    assert best_match(out, batch[:, :24]).mean() > 0.8


@pytest.mark.slow
def test_mask_prompt_chooses_the_memorised_row(real_text, overfit_mask):
    """The first 8 and last 4 tokens of a memorised row (the rows share their first 6) make the free ones follow
    that row: the fixed tokens are in the network's input from the first step, not only pasted over the output.
    Without them each sample would follow the row the model drifts to: about 4 of 16."""
    batch, K = real_text
    m, _, _ = overfit_mask
    pos = torch.arange(24)
    agree, best, prompted_row = prompted(m, batch[:, :24], (pos < 8) | (pos >= 20), per_row=4, steps=24)
    assert best == prompted_row and agree > 0.9, (best, agree)


@pytest.mark.slow
def test_ar_overfits_real_text_and_generates_it_back(real_text):
    batch, K = real_text  # each row starts with <|endoftext|>, renumbered; make it the model's BOS (last id)
    eot = batch[0, 0].item()
    swap = torch.arange(K)
    swap[eot], swap[K - 1] = K - 1, eot
    batch = swap[batch]
    m = build_model(ModelConfig(model_type='ar', vocab_size=K, block_size=24, n_layer=2, n_head=2, n_embd=64))
    first, last = train_steps(m, batch, 300)
    assert last < first / 10, (first, last)
    out = m.sample(8, 24, generator=torch.Generator().manual_seed(0))
    assert best_match(out, batch[:, 1:]).mean() > 0.9
