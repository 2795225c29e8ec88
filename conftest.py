"""Shared test fixtures: real TinyStories text, tokenized with the project's GPT-2 encoding."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from prepare import load_meta
from util import configure_optimizer, keep_freed_memory

keep_freed_memory()  # the tests' vocabulary-sized tensors are reused, not re-mapped at every step (util.py)

SHARED_TINYSTORIES = Path(__file__).resolve().parent.parent / 'shared' / 'data' / 'tinystories'


def pytest_configure(config):
    config.addinivalue_line('markers', 'gpu: needs a CUDA GPU; run them with  python -m pytest -q -m gpu')


def tinystories_documents(limit=None):
    """Stories from the shared sample files, in order (a line holding only <|endoftext|> separates them)."""
    docs = []
    for path in sorted(SHARED_TINYSTORIES.glob('*.txt')):
        text = path.read_text(encoding='utf-8')
        docs += [d.strip() for d in text.split('\n<|endoftext|>\n') if d.strip() and d.strip() != '<|endoftext|>']
        if limit is not None and len(docs) >= limit:
            return docs[:limit]
    return docs


@pytest.fixture(scope='session')
def story_batch():
    """make(n, length): n windows of real text, each an <|endoftext|> followed by the start of a story."""
    from prepare import get_encoding
    enc = get_encoding()
    docs = tinystories_documents(limit=64)

    def make(n, length):
        rows = []
        for doc in docs:
            ids = [enc.eot_token] + enc.encode_ordinary(doc)
            if len(ids) >= length:
                rows.append(ids[:length])
            if len(rows) == n:
                return torch.tensor(rows)
        raise AssertionError(f"not enough stories of {length} tokens")
    return make


def compact_vocab(batch):
    """Renumber the ids of a batch densely (0..K-1, order kept) so vocabulary-sized layers stay small in tests;
    the text is unchanged, only its ids. Returns (batch, K, inverse map)."""
    uniq, inv = torch.unique(batch, return_inverse=True)
    return inv, len(uniq), uniq


def compact_prepared(data_dir):
    """Renumber the ids of a prepared dataset densely (order kept, so <|endoftext|>, the largest GPT-2 id, becomes
    the last one) and rewrite meta.json to match: the same text and format with a vocabulary of a few thousand,
    so the vocabulary-sized layers of the tiny models cost little. Returns the new meta."""
    meta = load_meta(data_dir)
    arrays = {s: np.fromfile(os.path.join(data_dir, f'{s}.bin'), dtype=meta['dtype']) for s in meta['splits']}
    uniq = np.unique(np.concatenate(list(arrays.values())))
    assert uniq[-1] == meta['eot_token']
    for s, a in arrays.items():
        np.searchsorted(uniq, a).astype(meta['dtype']).tofile(os.path.join(data_dir, f'{s}.bin'))
    meta.update(vocab_size=len(uniq), eot_token=len(uniq) - 1, special_tokens={'<|endoftext|>': len(uniq) - 1})
    with open(os.path.join(data_dir, 'meta.json'), 'w') as f:
        json.dump(meta, f)
    return meta


def train_steps(model, batch, steps, lr=3e-3, seed=0):
    """Plain AdamW on one fixed batch; returns (first loss, mean of the last 10 losses)."""
    torch.manual_seed(seed)
    opt = configure_optimizer(model, 0.0, lr, (0.9, 0.99), 'cpu')
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses[0], sum(losses[-10:]) / 10


def best_match(samples, references):
    """For each sample, the largest fraction of positions equal to one of the reference rows."""
    return (samples[:, None, :] == references[None, :, :]).float().mean(-1).max(1).values


def prompted(model, rows, keep, per_row=3, **options):
    """Sample `per_row` sequences for each memorised row with the positions `keep` (a bool mask over the length)
    fixed to that row's tokens. Returns, over the free positions: the fraction equal to the prompted row, the
    index of the row each sample matches best, and the row each was prompted with. A sampler that ignores the
    fixed tokens while denoising (and only pastes them over its output) follows the rows at random."""
    n, L = rows.shape
    target = rows.repeat_interleave(per_row, 0)
    fixed = torch.where(keep, target, -1)
    out = model.sample(n * per_row, L, fixed=fixed, generator=torch.Generator().manual_seed(0), **options)
    free = ~keep
    agree = (out[:, free] == target[:, free]).float().mean().item()
    best = (out[:, None, free] == rows[None, :, free]).float().mean(-1).argmax(1)
    return agree, best.tolist(), torch.arange(n).repeat_interleave(per_row).tolist()
