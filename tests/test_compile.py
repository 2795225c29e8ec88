"""torch.compile sees every family's training and evaluation step as whole graphs: no graph break, and at
most one compilation per mode (train / eval) for a fixed input shape, counted by Dynamo's own counters.
The `eager` backend runs Dynamo's tracing (where breaks and recompilations happen) without Inductor's code
generation, so this stays quick on CPU; a break added to any forward fails here."""
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from model import MODEL_TYPES, ModelConfig, build_model


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
