"""Tests of bench.py: one tiny end-to-end run, in a subprocess as a user runs it."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, tinystories_documents


def run(script, *args, timeout=120):
    """Run a CLI of the repo in a subprocess (the way a user would); returns its stdout, fails with its stderr."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    p = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env=env)
    assert p.returncode == 0, f"{script} {' '.join(args)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


@pytest.mark.slow
def test_bench_end_to_end(tmp_path):
    text = tmp_path / 'text.txt'
    text.write_text('\n<|endoftext|>\n'.join(tinystories_documents(limit=60)), encoding='utf-8')
    out = tmp_path / 'bench.json'
    stdout = run('bench.py', "--families=['ar','mask','bits']", '--n_layer=1', '--n_head=2', '--n_embd=32',
                 '--block_size=16', '--batch_size=2', '--vocab_sizes=[4096,512]', '--iters=2', '--warmup=1',
                 '--sample_steps=4', '--cache_steps=20', '--peak_seconds=0.05', f'--prepare_text={text}',
                 '--device=cpu', f'--json={out}')
    res = json.load(open(out))
    assert set(res['peak_flops']) == {'float32', 'bfloat16'} and all(v > 0 for v in res['peak_flops'].values())
    rows = {(r['family'], r['dtype'], r['vocab_size']): r for r in res['train']}
    assert set(rows) == {(f, d, v) for f in ('ar', 'mask', 'bits') for d in ('float32', 'bfloat16') for v in (4096, 512)}
    for (f, d, v), r in rows.items():
        assert r['ms_per_iter'] > 0 and r['tokens_per_s'] > 0 and 0 < r['mfu'] and r['sample_tokens_per_s'] > 0
        assert r['vs_ar'] == pytest.approx(r['ms_per_iter'] / rows[('ar', d, v)]['ms_per_iter'])  # ar of its vocab
    assert rows[('bits', 'float32', 512)]['params'] < rows[('bits', 'float32', 4096)]['params']  # built at each size
    ratio = {m['measure']: m['value'] for m in res['summary']}['mask float32 training step, vocab 4096 / vocab 512']
    want = rows[('mask', 'float32', 4096)]['ms_per_iter'] / rows[('mask', 'float32', 512)]['ms_per_iter']
    assert ratio == f'{want:.2f}x'
    assert res['mask_cache']['uncached_nfe'] == 20 and res['mask_cache']['cached_nfe'] <= 20
    assert res['prepare']['tokens'] == res['prepare']['raw_tokens'] > 0 and res['prepare']['ratio'] > 0
    assert 'MFU' in stdout and '| ar ' in stdout
