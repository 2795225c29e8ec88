"""The GPU path end to end, for a developer with CUDA:  python -m pytest -q -m gpu   (skipped without CUDA).

Every family at its GPU-size config (config/dit_tinystories.py, config/<family>_gpu.py: 12 x 768, block 256)
trains 20 compiled bf16 steps on the shared TinyStories sample, then resumes, samples, and is scored by evaluate.py on
CUDA (likelihood and gen-PPL under the ar run); fp16 with loss scaling and torchrun with NCCL run once each. Sized to
finish in a few minutes on one H100/H200-class GPU (most of it is compilation).
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import tinystories_documents

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root (this file is in tests/)
CONFIGS = {'ar': 'ar_gpu', 'mask': 'mask_gpu', 'embed': 'dit_tinystories', 'bits': 'bits_gpu', 'analog': 'analog_gpu'}
SHORT = ['--max_iters=20', '--warmup_iters=5', '--eval_interval=20', '--eval_iters=2', '--log_interval=5',
         '--gradient_accumulation_steps=1', '--batch_size=16', '--tensorboard_log=False', '--device=cuda']


def run(script, *args, timeout=420, launcher=None):
    cmd = [*(launcher or [sys.executable]), script, *args]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    return out


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('gpu-data')
    text = tmp / 'stories.txt'
    text.write_text('\n<|endoftext|>\n'.join(tinystories_documents(limit=2000)) + '\n', encoding='utf-8')
    run('prepare.py', f'--input={text}', f'--out_dir={tmp / "data"}')
    return str(tmp / 'data')


@pytest.fixture(scope='module')
def trained(data_dir, tmp_path_factory):
    """20 compiled bf16 steps of every family at its GPU config: {family: out_dir}."""
    outs = {}
    for family, config in CONFIGS.items():
        out_dir = str(tmp_path_factory.mktemp(family) / 'out')
        log = run('train.py', f'config/{config}.py', *SHORT, f'--data_dir={data_dir}', f'--out_dir={out_dir}',
                  '--dtype=bfloat16', '--compile=True', '--always_save_checkpoint=True')
        assert 'first training iteration done' in log and 'step 20:' in log, log[-2000:]
        outs[family] = out_dir
    return outs


@pytest.mark.slow
@pytest.mark.parametrize('family', list(CONFIGS))
def test_compiled_bf16_run_resumes_and_samples(family, trained, data_dir):
    out_dir = trained[family]
    log = run('train.py', f'config/{CONFIGS[family]}.py', *SHORT, f'--data_dir={data_dir}', f'--out_dir={out_dir}',
              '--dtype=bfloat16', '--init_from=resume', '--max_iters=24', '--always_save_checkpoint=True')
    assert 'step 24:' in log
    steps = [] if family == 'ar' else ['--steps=20']
    out = run('sample.py', f'--out_dir={out_dir}', '--num_samples=2', '--length=64', *steps, '--device=cuda',
              '--dtype=bfloat16')
    assert 'tok/s' in out


@pytest.mark.slow
def test_evaluate_on_cuda(trained, tmp_path):
    ckpts = [trained[f] for f in CONFIGS]
    out_dir = str(tmp_path / 'eval')
    run('evaluate.py', f'--ckpts={ckpts!r}', f'--judge={trained["ar"]}', '--steps=[10]', '--num_samples=4',
        '--sample_batch_size=4', '--max_windows=8', '--device=cuda', f'--out_dir={out_dir}', '--plot=False')
    with open(os.path.join(out_dir, 'results.json')) as f:
        res = json.load(f)
    assert len(res['likelihood']) == len(CONFIGS) and res['unigram']['bits'] > 0
    assert all(r.get('gen_ppl') for r in res['rows'] if r['family'] != 'data')


@pytest.mark.slow
def test_fp16_with_loss_scaling(data_dir, tmp_path):
    log = run('train.py', 'config/dit_tinystories.py', *SHORT, f'--data_dir={data_dir}',
              f'--out_dir={tmp_path / "out"}', '--dtype=float16', '--compile=False')
    assert 'step 20:' in log and 'non-finite' not in log


@pytest.mark.slow
def test_torchrun_nccl_one_rank(data_dir, tmp_path):
    torchrun = shutil.which('torchrun') or os.path.join(os.path.dirname(sys.executable), 'torchrun')
    log = run('train.py', 'config/mask_gpu.py', *SHORT, f'--data_dir={data_dir}',
              f'--out_dir={tmp_path / "out"}', '--compile=False', '--backend=nccl',
              launcher=[torchrun, '--standalone', '--nproc_per_node=1'])
    assert 'ddp: 1 ranks' in log and 'identical on all ranks' in log
