"""probe.py: how much a prediction draws on its context, on toy models whose context says everything."""
import math

import pytest
import torch

from conftest import train_steps
from model import ModelConfig, build_model
from probe import probe_mask, probe_noisy

# window k is token k repeated: the token at any position is given by any other position, and by nothing else;
# probed: 64 windows (8 rounds of the 8), each at a random position, each beside a window of another token
WINDOWS = torch.arange(8).repeat_interleave(16).view(8, 16)
PROBED = WINDOWS.repeat(8, 1)
POS = torch.randint(0, 16, (64,), generator=torch.Generator().manual_seed(0))


def trained(model_type, steps, lr, **kw):
    torch.manual_seed(0)
    m = build_model(ModelConfig(model_type=model_type, vocab_size=16, block_size=16, n_layer=2, n_head=2, n_embd=32,
                                **kw))
    train_steps(m, WINDOWS, steps, lr=lr)
    return m.eval()


def test_mask_probe_sees_the_context_go_as_it_is_masked():
    out = probe_mask(trained('mask', 150, 1e-2), PROBED, POS, [0.0, 0.5, 1.0], torch.Generator().manual_seed(0))
    nats = {f: v.mean().item() for f, v in out.items()}
    assert nats[0.0] < 0.3 and nats[0.5] < 0.3  # one visible position names the window
    assert nats[1.0] > math.log(8) - 0.5        # none visible: at best the 8 windows' frequencies


def test_noisy_probe_gain_is_what_the_context_adds():
    m = trained('bits', 600, 3e-3, T=100, noise_schedule='cosine')
    out = probe_noisy(m, PROBED, POS, [40, 100], torch.Generator().manual_seed(0))
    own, other = (v.mean().item() for v in out[40])
    assert own < 0.5 and other - own > 2.0  # at t = 40 the other window's noisy tokens name another token
    own, other = (v.mean().item() for v in out[100])
    assert other - own == pytest.approx(0.0, abs=0.2)  # at t = T the context is pure noise either way
