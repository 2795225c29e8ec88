"""The bit code and the two bit families: `bits` (discrete bit flips) and `analog` (Analog Bits)."""
import math

import pytest
import torch

from conftest import best_match, train_steps
from model import (NUM_BITS, BitDiffusion, ModelConfig, bit_decode, bits_to_ids, build_model, ids_to_bits,
                   valid_id_logprobs)
from test_model import TOY_ENTROPY, toy_bound, toy_model

V = 50257


def test_bit_code_round_trips_every_gpt2_id():
    ids = torch.arange(V)
    bits = ids_to_bits(ids)
    assert bits.shape == (V, NUM_BITS) and set(bits.unique().tolist()) == {0, 1}
    assert torch.equal(bits_to_ids(bits), ids)
    assert ids_to_bits(torch.tensor(1))[-1] == 1 and ids_to_bits(torch.tensor(2 ** 15))[0] == 1  # MSB first
    assert len({tuple(b) for b in bits[:: 97].tolist()}) == len(bits[:: 97])  # distinct codes


def test_valid_id_distribution_is_normalised_over_valid_ids_only():
    logits = torch.randn(5, NUM_BITS) * 3
    lp = valid_id_logprobs(logits, V)
    assert lp.shape == (5, V)
    assert torch.allclose(lp.double().exp().sum(-1), torch.ones(5, dtype=torch.float64), atol=1e-4)
    # relative to the unnormalised product of bit probabilities, every valid id is scaled by the same factor
    code = ids_to_bits(torch.tensor([123, 40000])).float()
    raw = (code * torch.nn.functional.logsigmoid(logits[:1]) + (1 - code) * torch.nn.functional.logsigmoid(-logits[:1])).sum(-1)
    assert (lp[0, 123] - lp[0, 40000]).item() == pytest.approx((raw[0] - raw[1]).item(), abs=1e-3)


def bits_model(**kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(model_type='bits', vocab_size=V, block_size=8, n_layer=1, n_head=2, n_embd=32,
                                   T=100, **kw))


def test_flip_marginals_match_closed_form():
    m = bits_model(noise_schedule='linear')
    b0 = (torch.rand(200_000, NUM_BITS, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    g = torch.Generator().manual_seed(1)
    for t in (1, 10, 50, 100):
        bt = m.q_sample(b0, torch.full((b0.shape[0],), t), g)
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
            got = m.posterior_one(torch.tensor([[float(bt)]]), torch.tensor([[float(b0)]]),
                                  torch.tensor([t]), torch.tensor([s])).item()
            assert got == pytest.approx(expected, rel=1e-9)
            # and the chain is consistent: summing out b_s gives q(b_t | b_0) with flip (1 - abar_t)/2
            marg = sum(q(bs, b0, flip_0s) * q(bt, bs, flip_st) for bs in (0, 1))
            assert marg == pytest.approx(q(bt, b0, (1 - abar[t].item()) / 2), rel=1e-9)


@pytest.mark.parametrize('model_type', ['bits', 'analog'])
def test_samplers_never_emit_invalid_ids(model_type):
    """A head biased towards all-ones bits (id 65535, invalid) still decodes only to ids < 50257."""
    torch.manual_seed(0)
    m = build_model(ModelConfig(model_type=model_type, vocab_size=V, block_size=8, n_layer=1, n_head=2, n_embd=32,
                                T=20)).eval()
    with torch.no_grad():
        m.head.bias.fill_(6.0)
    for steps in (1, 5, 20):
        out = m.sample(16, 8, steps=steps, generator=torch.Generator().manual_seed(steps))
        assert ((out >= 0) & (out < V)).all()
    assert (bit_decode(torch.full((4, NUM_BITS), 8.0), V, torch.Generator().manual_seed(0), 1.0) < V).all()


@pytest.fixture(scope='module')
def real_text(story_batch):
    return story_batch(4, 32)


@pytest.mark.parametrize('model_type,steps', [('bits', {100: 0.8, 10: 0.8}), ('analog', {100: 0.8, 20: 0.6})])
def test_overfit_on_real_text_and_sample_it_back(real_text, model_type, steps):
    """Real GPT-2 ids (no renumbering: the 16-bit code covers the whole vocabulary). Deterministic DDIM with
    few steps reproduces less of the memorised text than the full chain, so it gets a lower bar."""
    torch.manual_seed(0)
    m = build_model(ModelConfig(model_type=model_type, vocab_size=V, block_size=32, n_layer=2, n_head=2, n_embd=64,
                                T=100))
    first, last = train_steps(m, real_text, 1500)
    assert last < first / 3, (first, last)
    for s, bar in steps.items():
        out = m.sample(8, 32, steps=s, generator=torch.Generator().manual_seed(s))
        assert best_match(out, real_text).mean() > bar, (s, best_match(out, real_text))
    assert m.nll(real_text).mean() < 4.0  # bits/token of memorised text, far below log2(50257) = 15.6


@pytest.mark.parametrize('model_type', ['bits', 'analog'])
def test_bound_is_not_below_the_entropy(model_type):
    m = toy_model(model_type, 400)
    bound, se = toy_bound(m)
    assert bound >= TOY_ENTROPY - 3 * se, (bound, se)
    # a usable number: bits is near the 3 bits/token of a uniform guess after this little training; the
    # Gaussian bound of analog pays for every imprecision of x0 at high signal-to-noise ratio, so it is looser
    assert bound < (8 if model_type == 'bits' else 50)


def test_exact_posterior_sampler_accepts_any_number_of_steps():
    m = bits_model().eval()
    for steps in (1, 2, 37, 100):
        m.sample(2, 8, steps=steps, generator=torch.Generator().manual_seed(0))
        assert m.nfe == steps
    with pytest.raises(ValueError, match='steps=101'):
        m.sample(2, 8, steps=101)
    assert isinstance(m, BitDiffusion)
