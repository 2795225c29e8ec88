"""Tests of checkpoint.py: a checkpoint saved atomically loads back into the same model (the one-line errors of
files that are not checkpoints are tested through sample.py, and the out_dir and resume guards through train.py)."""
import pytest
import torch

from checkpoint import load_checkpoint, save_checkpoint
from model import ModelConfig, build_model

TINY = dict(block_size=16, n_layer=2, n_head=2, n_embd=32, T=50, embed_dim=8)


def tiny(model_type='embed', **kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(**{**TINY, 'vocab_size': 100, 'model_type': model_type, **kw}))


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
