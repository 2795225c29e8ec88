"""The bit code and the two bit families: `bits` (discrete bit flips) and `analog` (Analog Bits)."""
import math

import pytest
import torch

from conftest import best_match, compact_vocab, prompted, train_steps
from diffusion import NUM_BITS, bits_to_ids, ids_to_bits, valid_codes
from model import ModelConfig, build_model
from test_model import TOY_ENTROPY, toy_bound, toy_model

V = 50257


def test_bit_code_round_trips_every_gpt2_id():
    ids = torch.arange(V)
    bits = ids_to_bits(ids)
    assert bits.shape == (V, NUM_BITS) and set(bits.unique().tolist()) == {0, 1}
    assert torch.equal(bits_to_ids(bits), ids)
    assert ids_to_bits(torch.tensor(1))[-1] == 1 and ids_to_bits(torch.tensor(2 ** 15))[0] == 1  # MSB first
    assert len({tuple(b) for b in bits[:: 97].tolist()}) == len(bits[:: 97])  # distinct codes


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
    assert torch.equal(m.decoder_logprobs(b_t[0], got[0]), got[0].log_softmax(-1))  # the decoder adds nothing more


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


def test_flip_marginals_match_closed_form():
    m = bits_model(noise_schedule='linear')
    b0 = (torch.rand(200_000, NUM_BITS, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    g = torch.Generator().manual_seed(1)
    for t in (1, 10, 50, 100):
        bt = m.process.q_sample(b0, torch.full((b0.shape[0],), t), g)
        rate = (bt != b0).double().mean().item()
        expected = (1 - m.abar[t].item()) / 2
        assert rate == pytest.approx(expected, abs=4 * math.sqrt(expected * (1 - expected) / b0.numel()) + 1e-6)


@pytest.mark.parametrize('t,s', [(2, 1), (40, 39), (90, 10), (100, 1)])
def test_bit_posterior_equals_bayes_rule_enumerated(t, s):
    """q(b_s | b_t, b_0) from the joint q(b_s | b_0) q(b_t | b_s), enumerated over the 2x2 cases (b_0, b_t)."""
    m = bits_model(noise_schedule='cosine')
    abar = m.abar
    flip_0s = (1 - abar[s].item()) / 2
    flip_st = (1 - abar[t].item() / abar[s].item()) / 2

    def q(b_next, b_prev, flip):
        return flip if b_next != b_prev else 1 - flip

    for b0 in (0, 1):
        for bt in (0, 1):
            joint = {bs: q(bs, b0, flip_0s) * q(bt, bs, flip_st) for bs in (0, 1)}
            expected = joint[1] / (joint[0] + joint[1])
            got = m.process.posterior_prob_one(torch.tensor([[float(bt)]]), torch.tensor([[float(b0)]]),
                                               torch.tensor([t]), torch.tensor([s])).item()
            assert got == pytest.approx(expected, rel=1e-9)
    # the model's forward draw and its posterior compose into the forward marginal at s: b_t ~ q(b_t | b_0), then
    # b_s ~ q(b_s | b_t, b_0) flips each bit of b_0 with probability (1 - abar_s) / 2
    g = torch.Generator().manual_seed(0)
    b0 = (torch.rand(100_000, NUM_BITS, generator=g) < 0.5).float()
    n = b0.shape[0]
    b_t = m.process.q_sample(b0, torch.full((n,), t), g)
    p1 = m.process.posterior_prob_one(b_t, b0, torch.full((n,), t), torch.full((n,), s))
    b_s = (torch.rand(b0.shape, generator=g, dtype=torch.float64) < p1).float()
    rate = (b_s != b0).double().mean().item()
    assert rate == pytest.approx(flip_0s, abs=5 * math.sqrt(flip_0s * (1 - flip_0s) / b0.numel()) + 1e-9)


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
