"""Tests of train.py and config/: its settings, a real short run, resume, DDP, AMP, compile, errors, signals.

Training runs use real TinyStories tokens (a few hundred stories, prepared once per session by prepare.py, see
conftest.py) and a tiny embed model; the runs in a subprocess are marked slow.
"""
import ast
import copy
import dataclasses
import glob
import json
import math
import os
import queue
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np

import pytest
import torch

import train
from checkpoint import load_checkpoint, write_atomic
from configurator import configure
from conftest import ROOT, TINY_TRAIN as TINY, evals, hand_compact_data, run_train, weights
from diffusion import stream_seed
from model import ModelConfig, build_model
from prepare import TokenWindows, Vocab, load_meta, unigram_logprobs
from system import fingerprint

# --------------------------------------------------------------------------------------------------
# train.py's settings and config/

def config_of(path):
    ns = {k: getattr(train, k) for k in train._config_keys}
    configure(ns, [path], keys=train._config_keys, verbose=False, prog='train.py')
    return ns


def test_config_files():
    """The training configs: a CPU one per family (config/<family>_cpu.py) and a GPU one (config/<family>_gpu.py,
    embed's the card's config/dit_tinystories.py), each group with one backbone and token budget; every config's first
    line says which machine it is for; no more than 25 files in config/."""
    names = [n for n in sorted(os.listdir(os.path.join(ROOT, 'config'))) if n.endswith('.py')]
    assert len(names) <= 25
    for n in names:
        with open(os.path.join(ROOT, 'config', n)) as f:
            first = f.readline()
        machine = '# CPU' if n.endswith('_cpu.py') else '# GPU' if n.endswith(('_gpu.py', '_tinystories.py')) else None
        assert first.startswith(machine or ('# CPU', '# GPU')), (n, first)
    groups = {'cpu': [f'config/{f}_cpu.py' for f in ('embed', 'bits', 'analog', 'mask', 'ar')],
              'gpu': ['config/dit_tinystories.py'] + [f'config/{f}_gpu.py' for f in ('bits', 'analog', 'mask', 'ar')]}
    shared = ('n_layer', 'n_head', 'n_embd', 'block_size', 'batch_size', 'gradient_accumulation_steps',
              'max_iters', 'learning_rate', 'dataset')
    for group, paths in groups.items():
        members = {p: config_of(os.path.join(ROOT, p)) for p in paths}
        assert [c['model_type'] for c in members.values()] == ['embed', 'bits', 'analog', 'mask', 'ar'], group
        assert len({c['out_dir'] for c in members.values()}) == 5, f"{group} configs must not share an out_dir"
        for k in shared:  # every family gets the same backbone and token budget (the quick start, embed_cpu.py, the
            # steps its ten minutes hold)
            exempt = 'config/embed_cpu.py' if k == 'max_iters' else None
            assert len({c[k] for p, c in members.items() if p != exempt}) == 1, f"{group} configs differ in {k}"
        for c in members.values():
            # a valid model (vocab_size 0: the data's, filled in by train.py)
            ModelConfig(**{k: c[k] for k in ModelConfig.__dataclass_fields__ if k != 'vocab_size'})


def test_model_settings_are_model_configs_fields_with_its_defaults():
    """train.py writes out every field of model.ModelConfig as a setting, in one block in ModelConfig's order, each
    with ModelConfig's default (of the same type) and a comment; vocab_size alone differs: 0, the data's. So the two
    lists cannot drift apart, and a reader sees every knob in train.py."""
    with open(os.path.join(ROOT, 'train.py')) as f:
        src = f.read()
    lines = src.splitlines()
    settings = [(n.targets[0].id, n) for n in ast.parse(src).body if isinstance(n, ast.Assign)
                and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name) and n.targets[0].id in train._config_keys]
    names = [k for k, _ in settings]
    fields = dataclasses.fields(ModelConfig)
    assert len(names) == len(set(names)) == len(train._config_keys), "every setting assigned once, by name"
    first = names.index(fields[0].name)
    assert names[first:first + len(fields)] == [f.name for f in fields]
    for f, (name, node) in zip(fields, settings[first:first + len(fields)]):
        value, default = ast.literal_eval(node.value), (0 if f.name == 'vocab_size' else f.default)
        assert value == default and type(value) is type(default), (name, value, default)
        assert getattr(train, name) == default and '  # ' in lines[node.lineno - 1], name


# --------------------------------------------------------------------------------------------------
# training runs

def test_learning_rate_schedules_against_their_closed_forms():
    """cosine: warmup, then min_lr + (lr - min_lr)(1 + cos(pi r)) / 2; wsd: warmup, lr until the last cooldown_iters
    steps, then linear to min_lr, so its stable phase is the same whatever max_iters is (what lets one stem serve
    every branch, sweep.py)."""
    c = dict(decay_lr=True, learning_rate=1.0, min_lr=0.1, warmup_iters=4, max_iters=24, lr_decay_iters=24,
             lr_schedule='cosine', cooldown_iters=0)
    assert train.get_lr(1, c) == pytest.approx(2 / 5)
    assert train.get_lr(14, c) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * 10 / 20)) / 2)
    assert train.get_lr(30, c) == 0.1
    w = {**c, 'lr_schedule': 'wsd', 'cooldown_iters': 8}
    assert [train.get_lr(it, w) for it in (1, 4, 16)] == pytest.approx([2 / 5, 1.0, 1.0])
    assert [train.get_lr(it, w) for it in (17, 20, 23)] == pytest.approx([0.1 + 0.9 * k / 8 for k in (7, 4, 1)])
    longer = {**w, 'max_iters': 100, 'cooldown_iters': 0}  # the stem: constant to its end, whatever its length
    assert all(train.get_lr(it, longer) == train.get_lr(it, w) for it in range(16))
    assert train.get_lr(99, longer) == 1.0


@pytest.mark.slow
def test_short_run_loss_falls_and_checkpoint_loads(short_run):
    out_dir, out = short_run
    e = evals(out)
    assert [i for i, _, _ in e] == [0, 10, 20, 30]
    assert e[-1][2] < e[0][2] - 0.2, f"val loss did not fall clearly: {e}"
    assert e[-1][1] < e[0][1] - 0.2, f"train loss did not fall clearly: {e}"
    assert re.search(r"iter 30: loss [\d.]+, lr [\d.e+-]+, [\d.]+ ms/iter, [\d,]+ tok/s, mfu [\d.]+%", out), out
    model, ckpt = load_checkpoint(out_dir, use_ema=False)  # the shared loader rebuilds it
    assert ckpt['iter_num'] == 30 and ckpt['model_args']['n_embd'] == 32 and ckpt['ema'] is None
    assert ckpt['config']['max_iters'] == 30 and ckpt['config']['lr_decay_iters'] == 30  # derived, stored
    assert ckpt['meta']['vocab_size'] == 50257 and ckpt['optimizer']['state']
    assert abs(ckpt['best_val_loss'] - e[-1][2]) < 1e-3
    assert os.listdir(os.path.join(out_dir, 'tb')), "no TensorBoard events"
    X = TokenWindows(ckpt['config']['data_dir'], 'val', 32).random_batch(4, step=0)
    torch.manual_seed(0)
    assert torch.isfinite(model(X))


@pytest.mark.slow
def test_eval_log_holds_the_bound_beside_the_unigram_line(short_run):
    """Each evaluation logs held-out bits/token (the family's bound) and the unigram cross-entropy of the very
    val windows it scored, computed here again from the train split's counts."""
    out_dir, out = short_run
    with open(os.path.join(out_dir, 'eval_log.jsonl')) as f:
        recs = [json.loads(line) for line in f]
    assert [r['iter'] for r in recs] == [0, 10, 20, 30]
    assert [r['tokens'] for r in recs] == [0, 10 * 8 * 32, 20 * 8 * 32, 30 * 8 * 32]
    data_dir = weights(out_dir)['config']['data_dir']
    lp = torch.from_numpy(unigram_logprobs(data_dir, 'train'))
    val = TokenWindows(data_dir, 'val', 32)
    x = torch.cat([val.random_batch(8, step=k, seed=train._EVAL_SEED, rank=0) for k in range(2)])
    expected = -lp[x].mean().item() / math.log(2)
    assert all(abs(r['unigram_bits'] - expected) < 1e-9 for r in recs)
    assert f"unigram {expected:.3f})" in out
    assert recs[-1]['val_bits'] < recs[0]['val_bits'] and recs[-1]['train_seconds'] > recs[1]['train_seconds'] > 0
    # the last figure again from the saved weights: 16 windows, so 4 draws each (64 in all), its standard error from
    # the windows' spread
    model, _ = load_checkpoint(out_dir, use_ema=False)

    def window_bits(k):
        gen = torch.Generator().manual_seed(stream_seed(train._EVAL_SEED, 1, k))
        x = val.random_batch(8, step=k, seed=train._EVAL_SEED, rank=0)
        return (sum(model.position_nll(x, generator=gen).double() for _ in range(4)) / 4).mean(1)
    bits = torch.cat([window_bits(k) for k in range(2)])
    assert abs(recs[-1]['val_bits'] - bits.mean().item()) < 1e-6
    assert abs(recs[-1]['val_bits_se'] - (bits.std() / math.sqrt(len(bits))).item()) < 1e-6
    assert f"{bits.mean().item():.3f} ± {recs[-1]['val_bits_se']:.3f} bits/token" in out


def test_val_bits_and_the_unigram_line_per_gpt2_token_and_byte_on_a_compact_vocabulary(tmp_path):
    """On a hand-made compact vocabulary (' the', ' and', <|unk|>, <|endoftext|>; hand_compact_data), the figures
    train.py logs at iteration 0 of an `ar` run, computed here again from the very val windows it scores: the
    unigram line fitted on the train split (add-1/2 over GPT-2's ids), <|unk|> charged log2(50,254) more bits for
    the model and the unigram alike, and the bytes of <|unk|> the val split's mean (20 bytes over 4: 5)."""
    train_ids = [3, 0, 0, 1, 0, 1, 3, 0, 1, 0, 0, 1, 3, 1, 0, 0]
    d = hand_compact_data(tmp_path / 'd', {'train': train_ids, 'val': [3, 0, 2, 1, 2, 0, 0, 1, 3, 2, 0, 1, 2, 0, 3, 1]},
                          {'val': 20})
    out = str(tmp_path / 'out')
    train.main([*TINY, '--model_type=ar', '--n_embd=16', '--block_size=4', '--batch_size=2', '--max_iters=0',
                f'--data_dir={d}', f'--out_dir={out}'])
    with open(os.path.join(out, 'eval_log.jsonl')) as f:
        rec = json.loads(f.readline())
    x = torch.cat([TokenWindows(d, 'val', 5).random_batch(2, step=k, seed=train._EVAL_SEED, rank=0) for k in range(2)])
    y = x[:, 1:]  # what ar predicts
    assert (y == 2).any()  # the case the charge is about occurs
    charge = (y == 2).double() * math.log2(50254)
    nbytes = torch.tensor([4.0, 4.0, 5.0, 0.0], dtype=torch.float64)[y].sum()
    # fitted over GPT-2's 50,257 ids: <|unk|> gets 1/2 for each of the 50,254 it stands for
    counts = torch.bincount(torch.tensor(train_ids), minlength=4).double() + torch.tensor([0.5, 0.5, 50254 / 2, 0.5])
    unigram = -(counts / (len(train_ids) + 50257 / 2)).log2()[y] + charge
    assert rec['unigram_bits'] == pytest.approx(unigram.mean().item(), rel=1e-9)
    assert rec['unigram_bits_per_byte'] == pytest.approx((unigram.sum() / nbytes).item(), rel=1e-9)
    model, _ = load_checkpoint(out, use_ema=False)
    bits = model.position_nll(x).double() + charge
    assert rec['val_bits'] == pytest.approx(bits.mean().item(), rel=1e-6)
    assert rec['val_bits_per_byte'] == pytest.approx((bits.sum() / nbytes).item(), rel=1e-6)


def test_few_val_windows_take_more_draws_of_the_bound(small_vocab, tmp_path):
    """2 val windows: the bound is the mean of 32 draws on each (64 in all), not one right-skewed draw, which can sit
    near zero for an untrained model. Red if every window keeps one draw."""
    out = str(tmp_path / 'out')
    train.main([*TINY, *small_vocab[1], '--batch_size=1', '--eval_iters=2', '--max_iters=0', f'--out_dir={out}'])
    with open(os.path.join(out, 'eval_log.jsonl')) as f:
        rec = json.loads(f.readline())
    model, _ = load_checkpoint(out, use_ema=False)
    c = {'batch_size': 1, 'device': 'cpu'}
    d = weights(out)['config']['data_dir']
    window = []
    for k in range(2):
        gen = torch.Generator().manual_seed(stream_seed(train._EVAL_SEED, 1, k))
        x = train.get_batch(TokenWindows(d, 'val', model.config.block_size), c, k, train._EVAL_SEED, 0)
        draws = torch.stack([model.position_nll(x, generator=gen).double() for _ in range(32)]).mean(0)
        window.append((draws + Vocab(load_meta(d)).gpt2_bits(x)).mean())
    assert rec['val_bits'] == pytest.approx(torch.stack(window).mean().item(), rel=1e-6)


@pytest.mark.slow
def test_resume_gives_the_same_weights_as_a_straight_run(small_vocab, tmp_path):
    # EMA and gradient accumulation on, so their state and the micro-step data stream are covered too
    common = [*TINY, *small_vocab[1], '--eval_interval=3', '--always_save_checkpoint=True',
              '--ema_decay=0.9', '--gradient_accumulation_steps=2', '--lr_decay_iters=6']
    a, b = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
    run_train([*common, f'--out_dir={a}', '--max_iters=6'])
    run_train([*common, f'--out_dir={b}', '--max_iters=3'])
    half = weights(b)
    assert half['iter_num'] == 3
    run_train([*common, f'--out_dir={b}', '--max_iters=6', '--init_from=resume'])
    wa, wb = weights(a), weights(b)
    assert wb['iter_num'] == 6
    for part in ('model', 'ema'):
        for k in wa[part]:
            assert torch.equal(wa[part][k], wb[part][k]), f"{part}.{k} differs after resume"
    # and the resume did something: the weights moved between iterations 3 and 6
    assert any(not torch.equal(half['model'][k], wb['model'][k]) for k in wb['model'])


@pytest.mark.slow
def test_a_killed_run_resumes(small_vocab, tmp_path):
    """kill -9 in the middle of a run that checkpoints often, then resume it to the end."""
    out_dir = str(tmp_path / 'out')
    args = [*TINY, *small_vocab[1], f'--out_dir={out_dir}', '--eval_interval=2', '--eval_iters=1',
            '--always_save_checkpoint=True']
    p = subprocess.Popen([sys.executable, 'train.py', *args, '--max_iters=400'], cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    ckpt, deadline = os.path.join(out_dir, 'ckpt.pt'), time.time() + 120
    while (not os.path.exists(ckpt) or weights(out_dir)['iter_num'] < 6) and time.time() < deadline and \
            p.poll() is None:
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_at = weights(out_dir)['iter_num']
    assert 6 <= killed_at < 400
    _, out = run_train([*args, '--init_from=resume', f'--max_iters={killed_at + 4}'])
    assert f"step {killed_at + 4}:" in out and weights(out_dir)['iter_num'] == killed_at + 4


@pytest.mark.slow
def test_nonfinite_loss_stops_and_keeps_the_checkpoint(short_run, tmp_path):
    out_dir = str(tmp_path / 'out')
    shutil.copytree(short_run[0], out_dir)
    path = os.path.join(out_dir, 'ckpt.pt')
    with open(path, 'rb') as f:
        before = f.read()
    # an absurd learning rate with no warmup: after one step the weights overflow and the loss is NaN
    rc, out = run_train([*TINY, f'--data_dir={weights(out_dir)["config"]["data_dir"]}', f'--out_dir={out_dir}',
                         '--init_from=resume', '--max_iters=40', '--eval_interval=1000', '--learning_rate=1e30',
                         '--warmup_iters=0', '--decay_lr=False', '--grad_clip=0'], check=False)
    assert rc != 0
    assert re.search(r"non-finite loss \((nan|inf)\) at iteration 31", out), out
    assert 'last checkpoint: iteration 30' in out
    with open(path, 'rb') as f:
        assert f.read() == before, "the checkpoint must be left as it was"


@pytest.mark.slow
def test_a_diverging_run_that_always_saves_keeps_its_last_good_checkpoint(small_vocab, tmp_path):
    """always_save_checkpoint (every sweep run and the judge's config set it) must not save NaN weights over the good
    ones at an evaluation, and the last line says which checkpoint is left."""
    data_args, out_dir = small_vocab[1], tmp_path / 'out'
    args = [*TINY, *data_args, f'--out_dir={out_dir}', '--always_save_checkpoint=True', '--eval_interval=1']
    train.main([*args, '--max_iters=2'])
    before = (out_dir / 'ckpt.pt').read_bytes()
    with pytest.raises(SystemExit) as e:  # the loss is read only every 1000 steps: the evaluation must see it
        train.main([*args, '--init_from=resume', '--max_iters=6', '--learning_rate=1e30', '--warmup_iters=0',
                    '--decay_lr=False', '--grad_clip=0', '--log_interval=1000'])
    msg = str(e.value.code)
    assert re.fullmatch(r"train\.py: non-finite \w+ loss \((nan|inf)\) at the evaluation of iteration 3; stopping\. "
                        r".*ckpt\.pt is left as it was \(last checkpoint: iteration 2\)", msg), msg
    assert (out_dir / 'ckpt.pt').read_bytes() == before
    assert all(math.isfinite(v) for r in map(json.loads, open(out_dir / 'eval_log.jsonl')) for v in r.values()
               if isinstance(v, float))


@pytest.mark.parametrize('where', ['model', 'ema'])
def test_non_finite_weights_are_never_saved(tmp_path, where):
    """The save itself refuses them, so no path (an evaluation, a signal's stop) writes a diverged checkpoint."""
    model = build_model(ModelConfig(model_type='mask', vocab_size=64, n_layer=1, n_head=2, n_embd=32, block_size=8))
    ema = copy.deepcopy(model)
    with torch.no_grad():
        next((ema if where == 'ema' else model).parameters()).view(-1)[0] = float('inf')
    path = str(tmp_path / 'ckpt.pt')
    with pytest.raises(SystemExit) as e:
        train.save(path, {'iter_num': 5, 'model': model.state_dict()}, model, ema, None)
    msg = str(e.value.code)
    assert msg.startswith('train.py: non-finite weights (') and 'at iteration 5; stopping without saving' in msg, msg
    assert ('of the EMA' in msg) == (where == 'ema') and 'last checkpoint: none written yet' in msg
    assert not os.path.exists(path)


@pytest.mark.slow
def test_ddp_two_ranks_gloo(small_vocab, tmp_path):
    out_dir = str(tmp_path / 'out')
    # gradient_accumulation_steps=1 (the configs' value) on 2 ranks: rounded up to 2, with a message
    _, out = run_train([*TINY, *small_vocab[1], f'--out_dir={out_dir}', '--max_iters=4',
                        '--eval_interval=4', '--device=cpu'],
                       launcher=[sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2'])
    assert 'gradient_accumulation_steps=1 rounded up to 2, a multiple of the 2 DDP ranks' in out
    # each rank drew the windows of its own rank in TokenWindows' stream, and they differ
    m = re.search(r"ddp: 2 ranks, first micro-batch fingerprints \['(\w+)', '(\w+)'\]", out)
    assert m, out
    loader = TokenWindows(small_vocab[0], 'train', 32)
    expect = [fingerprint([loader.random_batch(8, step=0, seed=train.seed, rank=r)]) for r in (0, 1)]
    assert list(m.groups()) == expect and expect[0] != expect[1]
    # and they end with bitwise identical weights
    m = re.search(r"ddp: final weight fingerprints \['(\w+)', '(\w+)'\] \(identical on all ranks\)", out)
    assert m and m.group(1) == m.group(2), out
    ckpt = weights(out_dir)
    assert ckpt['iter_num'] == 4 and fingerprint(ckpt['model'].values()) == m.group(1)
    assert '2 ranks x 1 micro-batches' in out


@pytest.mark.slow
def test_bf16_autocast_on_cpu(data_dir, tmp_path):
    out_dir = str(tmp_path / 'out')
    # bf16 matmuls are slow on a CPU without bf16 units (~3 s a step here): 6 steps of 4 windows
    _, out = run_train([*TINY, f'--data_dir={data_dir}', f'--out_dir={out_dir}', '--max_iters=6',
                        '--eval_interval=6', '--batch_size=4', '--dtype=bfloat16'])
    assert 'dtype=bfloat16' in out
    e = evals(out)
    assert e[-1][2] < e[0][2], e
    # the weights stay fp32 under autocast (the bound's time-proposal statistics are float64 buffers)
    assert all(v.dtype in (torch.float32, torch.float64) for v in weights(out_dir)['model'].values()
               if v.is_floating_point())


@pytest.mark.slow
def test_compile(data_dir, tmp_path):
    out_dir = str(tmp_path / 'out')
    _, out = run_train([*TINY, f'--data_dir={data_dir}', f'--out_dir={out_dir}', '--max_iters=2',
                        '--eval_interval=2', '--eval_iters=1', '--compile=True', '--model_type=ar'], timeout=400)
    assert 'compile=True' in out and weights(out_dir)['iter_num'] == 2
    # the checkpoint holds the un-compiled module's names (no _orig_mod. prefix), so the loader reads it
    assert not any(k.startswith('_orig_mod') for k in weights(out_dir)['model'])
    load_checkpoint(out_dir)


# --------------------------------------------------------------------------------------------------
# bad configurations: one clear line and a non-zero exit

@pytest.mark.slow
def test_bad_configuration_exits_with_a_clear_message(data_dir, tmp_path):
    rc, out = run_train([*TINY, f'--data_dir={data_dir}', '--n_embdd=64'], check=False)
    assert rc != 0 and "unknown config key 'n_embdd'; did you mean 'n_embd'?" in out and 'Traceback' not in out
    f = tmp_path / 'bad.py'
    f.write_text("max_iter = 10\n")
    rc, out = run_train([str(f)], check=False)
    assert rc != 0 and "unknown config key 'max_iter'; did you mean 'max_iters'?" in out and str(f) in out


@pytest.mark.parametrize('argv, words', [
    (['--batch_size=8.0'], ['batch_size=8.0', 'expected an int']),
    (['--data_dir=/nonexistent/data'], ["'/nonexistent/data' does not exist", 'prepare.py']),
    (['--vocab_size=1000'], ['vocab_size=1000', "data's vocab_size=50257"]),
    (['--block_size=100000'], ['block_size=100000', 'fewer than one window']),
    (['--model_type=diffusion'], ['model_type', 'diffusion']),
    (['--init_from=resume'], ["no checkpoint"]),
    (['--eval_only=True'], ["init_from=resume"]),
    (['--dtype=float16'], ["float16", 'CUDA']),
    (['--dtype=fp8'], ["dtype='fp8'"]),
    # one line each, never a traceback
    (['--n_embd=0'], ['n_embd must be >= 1']),
    (['--device=tpu'], ["device='tpu', expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"]),
    (['--beta1=2.0'], ['beta1=2.0, expected in [0, 1)']),
    (['--seed=18446744073709551616'], ['seed=18446744073709551616, expected < 2**64']),
])
def test_bad_configuration_in_process(argv, words, data_dir, tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main([*TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path}', *argv])
    msg = str(e.value.code)
    assert msg.startswith('train.py: '), msg
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize('value', ["float('nan')", "float('inf')", '-1e-3', '0.0'])
def test_nonfinite_or_nonpositive_learning_rate_is_one_line(value, data_dir, tmp_path):
    f = tmp_path / 'lr.py'
    f.write_text(f"learning_rate = {value}\n")
    with pytest.raises(SystemExit) as e:  # the config file comes last, so its value wins over TINY's
        train.main([*TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path}/out', '--max_iters=1', str(f)])
    msg = str(e.value.code)
    assert msg.startswith('train.py: learning_rate=') and '\n' not in msg, msg


def test_unwritable_out_dir_stops_before_any_work(data_dir, capsys):
    # a path under a regular file can never be a directory (root ignores permission bits, so no chmod here)
    bad = os.path.join(ROOT, 'README.md', 'out')
    with pytest.raises(SystemExit) as e:
        train.main([*TINY, f'--data_dir={data_dir}', f'--out_dir={bad}', '--max_iters=1'])
    assert str(e.value.code).startswith(f"train.py: cannot write out_dir='{bad}'"), e.value.code
    assert 'model_type=' not in capsys.readouterr().out  # nothing was built


@pytest.mark.slow
def test_fresh_run_into_an_out_dir_with_a_checkpoint_stops_unless_told(data_dir, tmp_path):
    out_dir = tmp_path / 'out'
    out_dir.mkdir()
    (out_dir / 'ckpt.pt').write_bytes(b'earlier work')
    args = [*TINY, f'--data_dir={data_dir}', f'--out_dir={out_dir}', '--max_iters=1', '--eval_interval=1']
    with pytest.raises(SystemExit) as e:
        train.main(args)
    msg = str(e.value.code)
    assert 'ckpt.pt exists' in msg and '--init_from=resume' in msg and '--overwrite=True' in msg, msg
    assert (out_dir / 'ckpt.pt').read_bytes() == b'earlier work'
    train.main([*args, '--overwrite=True'])
    assert weights(out_dir)['iter_num'] == 1


@pytest.mark.slow
def test_resume_with_another_model_shape_names_the_key_and_both_values(short_run, tmp_path):
    out_dir = str(tmp_path / 'out')
    shutil.copytree(short_run[0], out_dir)
    with pytest.raises(SystemExit) as e:
        train.main([*TINY, f'--data_dir={weights(out_dir)["config"]["data_dir"]}', f'--out_dir={out_dir}',
                    '--init_from=resume', '--max_iters=30', '--n_layer=2'])
    msg = str(e.value.code)
    assert msg.startswith('train.py: resume: n_layer=2 in the config but 1 in ') and '\n' not in msg, msg


def test_token_ids_beyond_the_vocabulary_stop_the_run(data_dir, tmp_path):
    bad = tmp_path / 'data'
    shutil.copytree(data_dir, bad)
    n = os.path.getsize(bad / 'train.bin') // 2
    np.full(n, 65000, dtype=np.uint16).tofile(bad / 'train.bin')  # the right size, ids past 50,257
    with pytest.raises(SystemExit) as e:
        train.main([*TINY, f'--data_dir={bad}', f'--out_dir={tmp_path}/out', '--max_iters=1', '--model_type=bits'])
    msg = str(e.value.code)
    assert 'train.bin holds token id 65000' in msg and 'vocab_size=50257' in msg and '\n' not in msg, msg


@pytest.mark.slow
def test_mfu_never_passes_100_percent(data_dir, tmp_path, capsys):
    # a peak far below what any machine does, as a probe taken under load can be
    train.main([*TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path}/out', '--max_iters=3', '--eval_interval=3',
                '--peak_flops=1.0'])
    out = capsys.readouterr().out
    mfus = [float(m) for m in re.findall(r"mfu ([\d.]+)%", out)]
    assert len(mfus) == 3 and max(mfus) <= 100.0, out
    assert 'using it as the peak from now on' in out


@pytest.mark.slow
def test_failed_save_is_one_line_and_keeps_the_checkpoint(short_run, tmp_path):
    """A full disk, for real: a file size limit (RLIMIT_FSIZE) makes the checkpoint write fail as ENOSPC does."""
    out_dir = str(tmp_path / 'out')
    shutil.copytree(short_run[0], out_dir)
    with open(os.path.join(out_dir, 'ckpt.pt'), 'rb') as f:
        before = f.read()

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    p = subprocess.run([sys.executable, 'train.py', *TINY, f'--data_dir={weights(out_dir)["config"]["data_dir"]}',
                        f'--out_dir={out_dir}', '--init_from=resume', '--max_iters=31', '--eval_interval=1',
                        '--always_save_checkpoint=True'], cwd=ROOT, capture_output=True, text=True, timeout=240,
                       preexec_fn=limit)
    assert p.returncode != 0 and 'Traceback' not in p.stderr, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"train.py: cannot write {out_dir}/ckpt.pt at iteration 31: ") and 'disk full' in last
    with open(os.path.join(out_dir, 'ckpt.pt'), 'rb') as f:
        assert f.read() == before
    assert not glob.glob(os.path.join(out_dir, '.*.tmp'))


# --------------------------------------------------------------------------------------------------
# a run left by kill -9, and a run that is still going

@pytest.fixture(scope='module')
def zero_run(data_dir, tmp_path_factory):
    """max_iters=0 into an out_dir a killed run left: a 0-byte temp file of an interrupted save, and the lock of
    a process that no longer exists."""
    out_dir = tmp_path_factory.mktemp('zero') / 'out'
    out_dir.mkdir()
    (out_dir / '.ckpt.pt.k1ll3d.tmp').write_bytes(b'')
    dead = subprocess.Popen(['true'])
    dead.wait()
    (out_dir / 'run.lock').write_text(json.dumps({'pid': dead.pid, 'host': socket.gethostname()}))
    _, out = run_train([*TINY, f'--data_dir={data_dir}', f'--out_dir={out_dir}', '--max_iters=0'])
    return out_dir, out, dead.pid


@pytest.mark.slow
def test_max_iters_zero_saves_the_initial_weights_with_a_note(zero_run):
    out_dir, out, _ = zero_run
    assert 'max_iters=0: no training steps; the initial weights are evaluated and saved as iteration 0' in out
    assert weights(out_dir)['iter_num'] == 0 and evals(out)[0][0] == 0


@pytest.mark.slow
def test_temp_files_of_an_interrupted_save_are_removed(zero_run):
    out_dir, out, _ = zero_run
    assert 'removed 1 temp file(s) of an interrupted save' in out
    assert not list(out_dir.glob('.ckpt.pt.*.tmp'))


@pytest.mark.slow
def test_lock_of_a_dead_run_is_taken_over_and_released_at_exit(zero_run):
    out_dir, out, pid = zero_run
    assert f"taking over {out_dir}/run.lock: its pid {pid} on this host" in out
    assert not (out_dir / 'run.lock').exists()


@pytest.fixture(scope='class')
def live_run(data_dir, tmp_path_factory):
    """A run that goes on (stdout to a pipe, as with `> run.log`), read until its first evaluation line; after
    that it prints nothing for a long time. Yields (process, out_dir, lines read, still running when read).
    Class-scoped: the run is stopped as soon as the tests of TestLiveRun are done, not at the end of the file."""
    out_dir = str(tmp_path_factory.mktemp('live') / 'out')
    p = subprocess.Popen([sys.executable, 'train.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={out_dir}',
                          '--max_iters=100000', '--eval_interval=100000', '--log_interval=100000'],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={k: v for k, v in os.environ.items() if k != 'PYTHONUNBUFFERED'})  # Python's default
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in p.stdout], daemon=True).start()
    got, deadline = [], time.time() + 90
    while not any(line.startswith('step 0:') for line in got) and time.time() < deadline:
        try:
            got.append(lines.get(timeout=1))
        except queue.Empty:
            pass  # no line this second: keep waiting until the deadline
    yield p, out_dir, got, p.poll() is None
    p.kill()
    p.wait()


@pytest.mark.slow
class TestLiveRun:
    def test_log_lines_reach_a_pipe_as_they_are_printed(self, live_run):
        _, _, got, running = live_run
        assert running and any(line.startswith('step 0:') for line in got), got

    def test_a_second_run_on_a_locked_out_dir_stops_and_names_the_holder(self, live_run, data_dir):
        p, out_dir, _, _ = live_run
        rc, out = run_train([*TINY, f'--data_dir={data_dir}', f'--out_dir={out_dir}', '--max_iters=1'], check=False)
        assert rc != 0 and 'Traceback' not in out, out
        assert out.strip().splitlines()[-1] == (
            f"train.py: out_dir '{out_dir}' is in use by pid {p.pid} on host {socket.gethostname()} "
            f"({out_dir}/run.lock); wait for that run to end or use another out_dir (delete the file if that run is "
            f"dead)")


def test_val_ids_beyond_the_vocabulary_stop_the_run_at_start(data_dir, tmp_path):
    """Every split train.py reads is checked whole at start, val too (its evaluation windows would meet an id past
    the vocabulary only if they happened to cover it; here one id at the end of val.bin, which they do not)."""
    bad = tmp_path / 'data'
    shutil.copytree(data_dir, bad)
    ids = np.fromfile(bad / 'val.bin', dtype=np.uint16)
    ids[-1] = 65000
    ids.tofile(bad / 'val.bin')
    with pytest.raises(SystemExit) as e:
        train.main([*TINY, f'--data_dir={bad}', f'--out_dir={tmp_path}/out', '--max_iters=1'])
    msg = str(e.value.code)
    assert msg.startswith(f"train.py: {bad}/val.bin holds token id 65000, but its meta.json says vocab_size=50257"), msg
    assert '\n' not in msg


@pytest.mark.parametrize('argv, words', [
    (['--data_dir={tmp}/nothing'], "data_dir '{tmp}/nothing' does not exist"),
    (['--n_head=3'], 'invalid model configuration'),
])
def test_a_run_that_fails_before_writing_leaves_no_new_out_dir(data_dir, tmp_path, argv, words):
    argv = [a.replace('{tmp}', str(tmp_path)) for a in argv]
    new, old = tmp_path / 'new' / 'out', tmp_path / 'old'
    old.mkdir()
    for out_dir in (new, old):
        with pytest.raises(SystemExit) as e:
            train.main([*TINY, f'--data_dir={data_dir}', f'--out_dir={out_dir}', '--max_iters=1', *argv])
        assert words.replace('{tmp}', str(tmp_path)) in str(e.value.code), e.value.code
    assert not new.exists() and old.is_dir() and not list(old.iterdir())  # a pre-existing out_dir stays as it was


# --------------------------------------------------------------------------------------------------
# hostile inputs: Ctrl-C, SIGTERM and torchrun

STOP_LINE = re.compile(r"train\.py: (SIG\w+): stopped at iteration (\d+), saved in (\S+); resume with: (.+)")


def start_and_signal(cmd, signum, after='iter 2:', timeout=180):
    """Start a run, send it `signum` once its log shows `after`; returns (exit code, its whole output)."""
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in p.stdout], daemon=True).start()
    got, deadline = [], time.time() + timeout
    while not any(line.startswith(after) for line in got) and time.time() < deadline and p.poll() is None:
        try:
            got.append(lines.get(timeout=1))
        except queue.Empty:
            pass  # no line this second: keep waiting until the deadline
    p.send_signal(signum)
    try:
        p.wait(timeout=120)
    finally:
        p.kill()
    time.sleep(0.5)  # the reader thread drains the pipe
    while not lines.empty():
        got.append(lines.get())
    return p.returncode, ''.join(got)


@pytest.mark.slow
@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_the_current_iteration_and_says_how_to_resume(small_vocab, tmp_path, signum):
    out_dir = str(tmp_path / 'out')
    args = [*TINY, *small_vocab[1], f'--out_dir={out_dir}', '--max_iters=100000', '--eval_interval=100000']
    rc, out = start_and_signal([sys.executable, 'train.py', *args], signum)
    assert rc == 128 + signum and 'Traceback' not in out, out
    m = STOP_LINE.search(out)
    assert m and m.group(1) == signum.name and m.group(3) == f"{out_dir}/ckpt.pt", out
    stopped = int(m.group(2))
    assert weights(out_dir)['iter_num'] == stopped >= 2
    assert not os.path.exists(os.path.join(out_dir, 'run.lock')) and not glob.glob(os.path.join(out_dir, '.*.tmp'))
    assert m.group(4) == shlex.join(['python', 'train.py', *args, '--init_from=resume'])
    if signum == signal.SIGTERM:  # the command it prints continues the run from there
        cmd = shlex.split(m.group(4))
        _, out = run_train([*cmd[2:], f'--max_iters={stopped + 1}'])
        assert f"iter {stopped + 1}:" in out and weights(out_dir)['iter_num'] == stopped + 1


def test_a_second_signal_during_the_save_keeps_the_previous_checkpoint(small_vocab, tmp_path, monkeypatch):
    out_dir = str(tmp_path / 'out')
    args = [*TINY, *small_vocab[1], f'--out_dir={out_dir}', '--eval_interval=2', '--always_save_checkpoint=True']
    train.main([*args, '--max_iters=2'])
    with open(os.path.join(out_dir, 'ckpt.pt'), 'rb') as f:
        before = f.read()
    real_lr = train.get_lr

    def signal_during_step_3(it, c):  # the first signal, as a scheduler sends it, while iteration 3 trains
        if it == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_lr(it, c)

    def save_with_a_second_signal(path, ckpt):  # the second one arrives while the checkpoint is being written
        write_atomic(path, lambda tmp: (torch.save(ckpt, tmp), os.kill(os.getpid(), signal.SIGTERM), time.sleep(5)))
    monkeypatch.setattr(train, 'get_lr', signal_during_step_3)
    monkeypatch.setattr(train, 'save_checkpoint', save_with_a_second_signal)
    with pytest.raises(SystemExit) as e:
        train.main([*args, '--max_iters=100', '--eval_interval=100', '--init_from=resume'])
    assert str(e.value.code) == (f"train.py: a second SIGTERM during the save at iteration 3: stopped without it; "
                                 f"{out_dir}/ckpt.pt is left as it was (last checkpoint: iteration 2)")
    with open(os.path.join(out_dir, 'ckpt.pt'), 'rb') as f:
        assert f.read() == before
    assert not glob.glob(os.path.join(out_dir, '.*.tmp')) and not os.path.exists(os.path.join(out_dir, 'run.lock'))
    assert signal.getsignal(signal.SIGTERM) is not None and signal.getsignal(signal.SIGINT) is not None


TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']


@pytest.mark.slow
def test_ddp_sigterm_rank_0_saves_and_every_rank_stops(small_vocab, tmp_path):
    out_dir = str(tmp_path / 'out')
    args = [*TINY, *small_vocab[1], f'--out_dir={out_dir}', '--max_iters=100000', '--eval_interval=100000']
    rc, out = start_and_signal([*TORCHRUN, 'train.py', *args], signal.SIGTERM)  # to torchrun, which forwards it
    assert rc != 0
    m = STOP_LINE.search(out)
    assert m and len(STOP_LINE.findall(out)) == 1, out  # one line, from rank 0
    assert weights(out_dir)['iter_num'] == int(m.group(2)) >= 2
    assert m.group(4).startswith('torchrun --standalone --nproc_per_node=2 train.py ')
    assert 'train.py", line' not in out, out  # no traceback of ours from any rank
    assert 'SIGKILL' not in out, out  # every rank left by itself within torchrun's grace period
    assert not os.path.exists(os.path.join(out_dir, 'run.lock'))


@pytest.mark.slow
def test_torchrun_config_error_is_one_line_in_its_summary_without_a_traceback_of_ours(tmp_path):
    p = subprocess.run([*TORCHRUN, 'train.py', '--init_from=bogus', '--device=cpu', f'--out_dir={tmp_path}/out'],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    line = "train.py: init_from='bogus', expected 'scratch' or 'resume'"
    assert p.returncode != 0
    assert p.stderr.startswith(line + '\n') or (line + '\n') in p.stdout + p.stderr, p.stderr  # rank 0 prints it
    assert f"traceback : {line}" in p.stderr, p.stderr  # and torchrun's summary names it
    assert 'train.py", line' not in p.stdout + p.stderr


@pytest.mark.slow
def test_eval_only_gives_the_figures_the_run_logged_at_that_iteration(small_vocab, tmp_path, monkeypatch):
    """The same windows, the same draws and the same state: evaluating a checkpoint again reproduces the numbers its
    run logged. T=8 makes the bound's adaptive time proposal warm within a few steps (its statistics are buffers
    that a forward pass updates, evaluation's included)."""
    out_dir = str(tmp_path / 'out')
    args = [*TINY, *small_vocab[1], f'--out_dir={out_dir}', '--T=8', '--eval_iters=4', '--eval_interval=6']
    train.main([*args, '--max_iters=12', '--always_save_checkpoint=True'])
    with open(os.path.join(out_dir, 'eval_log.jsonl')) as f:
        logged = [json.loads(line) for line in f][-1]
    assert logged['iter'] == 12 and weights(out_dir)['iter_num'] == 12
    got = {}
    real = train.estimate_loss
    monkeypatch.setattr(train, 'estimate_loss', lambda *a: got.setdefault('out', real(*a)))
    before = os.stat(os.path.join(out_dir, 'ckpt.pt')).st_mtime_ns
    train.main([*args, '--init_from=resume', '--eval_only=True'])
    for k in ('train', 'val', 'val_bits', 'val_bits_se'):
        assert got['out'][k] == logged[k], (k, got['out'][k], logged[k])
    assert os.stat(os.path.join(out_dir, 'ckpt.pt')).st_mtime_ns == before  # evaluated, not written


def test_a_compact_data_dir_needs_no_flag_and_resuming_on_another_vocabulary_is_one_line(data_dir, tmp_path):
    """vocab_size 0 takes the data's (a compact vocabulary of the same stories here); resuming that checkpoint on
    the GPT-2-vocabulary data dir stops before any work, naming both vocabularies."""
    import prepare
    compact = str(tmp_path / 'compact')
    meta = prepare.prepare(input=os.path.join(os.path.dirname(data_dir), "stories.txt"), out_dir=compact, num_proc=1,
                           vocab='compact')
    out_dir = str(tmp_path / 'out')
    train.main([*TINY, f'--data_dir={compact}', f'--out_dir={out_dir}', '--max_iters=1', '--eval_interval=1'])
    assert weights(out_dir)['model_args']['vocab_size'] == meta['vocab_size'] < 50257
    with pytest.raises(SystemExit) as e:
        train.main([*TINY, f'--data_dir={data_dir}', f'--out_dir={out_dir}', '--init_from=resume', '--max_iters=2'])
    msg = str(e.value.code)
    assert 'was trained on a compact vocabulary' in msg and "holds GPT-2's vocabulary (50,257 ids)" in msg, msg
    assert '\n' not in msg


# --------------------------------------------------------------------------------------------------
# appends and locks that survive a crash

def test_a_fresh_run_never_truncates_an_earlier_runs_eval_log(data_dir, tmp_path):
    out_dir = tmp_path / 'out'
    out_dir.mkdir()
    (out_dir / 'eval_log.jsonl').write_text('{"iter": 0, "val": 9.0}\n')
    with pytest.raises(SystemExit) as e:
        train.main([*TINY, f'--data_dir={data_dir}', f'--out_dir={out_dir}', '--max_iters=1'])
    msg = str(e.value.code)
    assert msg.startswith(f"train.py: {out_dir / 'eval_log.jsonl'} holds an earlier run's evaluations") and \
        '--overwrite=True' in msg and '--init_from=resume' not in msg, msg  # no checkpoint there to resume
    assert (out_dir / 'eval_log.jsonl').read_text() == '{"iter": 0, "val": 9.0}\n'


def test_out_of_memory_is_one_line(data_dir, tmp_path, monkeypatch):
    def oom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 1099511627776 bytes.")
    monkeypatch.setattr(train, 'train', oom)
    with pytest.raises(SystemExit) as e:
        train.main([*TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path}/out', '--max_iters=1'])
    msg = str(e.value.code)
    assert msg.startswith("train.py: out of memory (RuntimeError: [enforce fail") and 'lower batch_size' in msg, msg


def test_no_mfu_without_a_stated_peak(small_vocab, tmp_path, capsys):
    """A probe beside the run read 90-97% on a busy machine where an idle bench.py gave 47-66%: without a stated
    peak_flops there is no MFU to print."""
    train.main([*TINY, *small_vocab[1], f'--out_dir={tmp_path}/out', '--max_iters=1', '--eval_interval=1',
                '--eval_iters=1', '--peak_flops=0'])
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith('iter 1: loss'))
    assert 'no MFU: set peak_flops' in out and 'mfu' not in line, out
