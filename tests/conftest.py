"""Shared test fixtures: real TinyStories text, tokenized with the project's GPT-2 encoding; prepared data and
train.py runs (test_train.py, test_loggers.py); and the `slow` marker.

    python -m pytest -q                  # everything (what CI runs), one worker per core (pytest.ini: -n auto)
    python -m pytest -q -m "not slow"    # all but the end-to-end runs and the other tests over ~5 s: ~2 minutes
    python -m pytest -q -n0 tests/test_model.py   # one process, no workers: for a debugger or a single file
"""
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

if os.environ.get('PYTEST_XDIST_WORKER'):
    # one thread per worker (pytest-xdist starts one per core): set before torch is imported, so the subprocesses the
    # tests start inherit it too. Two workers of all the cores each would oversubscribe them, and torch's threads then
    # wait on each other: a tiny model's step ran ~40x slower so.
    os.environ['OMP_NUM_THREADS'] = '1'

import numpy as np
import pytest
import torch

from prepare import load_meta
from system import keep_freed_memory
from train import configure_optimizer

if os.environ.get('PYTEST_XDIST_WORKER'):
    torch.set_num_threads(1)  # in case torch was imported before this file
keep_freed_memory()  # the tests' vocabulary-sized tensors are reused, not re-mapped at every step (system.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root (this file is in tests/)
TINYSTORIES = Path(ROOT) / 'corpus' / 'tinystories'  # the TinyStories sample shipped with the project (xz)


def pytest_configure(config):
    config.addinivalue_line('markers', 'gpu: needs a CUDA GPU; run them with  python -m pytest -q -m gpu')
    config.addinivalue_line('markers', 'slow: an end-to-end run of a script in a subprocess, or any test over ~5 s '
                                       'on two cores; leave them out with  python -m pytest -q -m "not slow"')


def tinystories_documents(limit=None):
    """Stories from the shipped sample files, in order (a line holding only <|endoftext|> separates them)."""
    docs = []
    for path in sorted(TINYSTORIES.glob('*.txt.xz')):
        text = lzma.decompress(path.read_bytes()).decode('utf-8')
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


def hand_compact_data(d, splits, unk_bytes):
    """A compact data dir written by hand: ids 0 ' the', 1 ' and', 2 <|unk|> (for the 50,254 GPT-2 ids it does not
    name), 3 <|endoftext|>. splits: {split: list of ids}; unk_bytes: {split: UTF-8 bytes of its <|unk|> tokens}."""
    d.mkdir(exist_ok=True)
    for name, ids in splits.items():
        np.array(ids, np.uint16).tofile(d / f'{name}.bin')
    meta = {'tokenizer': 'gpt2', 'vocab_size': 4, 'eot_token': 3, 'dtype': 'uint16',
            'splits': {name: {'tokens': len(ids), 'documents': ids.count(3), 'unk_tokens': ids.count(2),
                              'unk_bytes': unk_bytes.get(name, 0)} for name, ids in splits.items()},
            'compact': {'gpt2_ids': [262, 290, -1, 50256], 'unk_token': 2, 'unseen_gpt2_ids': 50254}}
    (d / 'meta.json').write_text(json.dumps(meta))
    return str(d)


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


# --------------------------------------------------------------------------------------------------
# prepared data and train.py runs (test_train.py, test_loggers.py)

# a model small enough that one iteration takes tens of milliseconds, still with the real 50,257-id vocabulary
TINY_TRAIN = ['--model_type=embed', '--n_layer=1', '--n_head=2', '--n_embd=32', '--block_size=32', '--embed_dim=16',
              '--batch_size=8', '--learning_rate=3e-3', '--warmup_iters=2', '--eval_iters=2', '--log_interval=1',
              '--device=cpu', '--dtype=float32', '--peak_flops=1e11', '--tensorboard_log=False']
EVAL_LINE = re.compile(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)")


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
    """Real tokens: the first 400 shipped TinyStories stories through prepare.py's CLI."""
    tmp = tmp_path_factory.mktemp('tinystories')
    text = tmp / 'stories.txt'
    text.write_text('\n<|endoftext|>\n'.join(tinystories_documents(limit=400)) + '\n', encoding='utf-8')
    out = tmp / 'data'
    subprocess.run([sys.executable, 'prepare.py', f'--input={text}', f'--out_dir={out}', '--num_proc=1'],
                   cwd=ROOT, check=True, capture_output=True, text=True)
    return str(out)


@pytest.fixture(scope='session')
def small_vocab(data_dir, tmp_path_factory):
    """The same stories with their ids renumbered densely (a vocabulary of a few thousand): for the tests whose
    subject is not the vocabulary (resume, DDP), where the 50,257-way layers would only cost time. Returns
    (its data_dir, the arguments that point train.py at it)."""
    out = str(tmp_path_factory.mktemp('small_vocab') / 'data')
    shutil.copytree(data_dir, out)
    return out, [f'--data_dir={out}', f"--vocab_size={compact_prepared(out)['vocab_size']}"]


def run_train(args, check=True, timeout=240, launcher=()):
    """train.py in a subprocess; returns its combined stdout + stderr (and asserts success if check)."""
    p = subprocess.run([*launcher, *([sys.executable, 'train.py'] if not launcher else ['train.py']), *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    out = p.stdout + p.stderr
    if check:
        assert p.returncode == 0, out
    return p.returncode, out


def evals(out):
    return [(int(i), float(tr), float(va)) for i, tr, va in EVAL_LINE.findall(out)]


def weights(path):
    return torch.load(os.path.join(path, 'ckpt.pt'), map_location='cpu', weights_only=True)


@pytest.fixture(scope='session')
def short_run(data_dir, tmp_path_factory):
    """30 iterations with TensorBoard on and a checkpoint at each evaluation; returns (out_dir, output)."""
    out_dir = str(tmp_path_factory.mktemp('short') / 'out')
    _, out = run_train([*TINY_TRAIN, f'--data_dir={data_dir}', f'--out_dir={out_dir}', '--max_iters=30',
                        '--eval_interval=10', '--tensorboard_log=True'])
    return out_dir, out
