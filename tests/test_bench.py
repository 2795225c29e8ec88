"""Tests of bench.py: one tiny end-to-end run, in a subprocess as a user runs it."""
import json
import os
import stat
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


# ---------------------------------------------------------------- hostile inputs: --json never replaces work

# a bench of a second, should a check let it run
TINIEST = ['--device=cpu', "--families=['ar']", "--dtypes=['float32']", '--n_layer=1', '--n_head=1', '--n_embd=8',
           '--block_size=4', '--batch_size=1', '--vocab_sizes=[16]', '--iters=1', '--warmup=0', '--sample_steps=0',
           '--cache_steps=0', "--prepare_text=", '--peak_seconds=0.01']

@pytest.mark.parametrize('target, overwrite, message', [
    ('ckpt.pt', True, 'is a checkpoint; bench.py never writes over one, not even with --overwrite=True'),
    ('train.bin', True, 'is a token split (.bin); bench.py never writes over one'),
    ('meta.json', True, "is a dataset's meta.json; bench.py never writes over one"),
    ('results.json', True, "is evaluate.py's results.json; bench.py never writes over one"),
    ('notes.txt', False, "exists and is not bench.py's own json; choose another path, or replace it with "
                         "--overwrite=True"),
    ('fifo', True, 'is a FIFO (named pipe); bench.py never writes over one'),
    ('link', True, 'is a symbolic link; bench.py never writes over one'),
    ('device', True, 'is a device file; bench.py never writes over one'),
    ('dir', True, 'cannot write json='),
])
def test_json_never_replaces_what_bench_did_not_write(tmp_path, target, overwrite, message):
    """--json at a file bench.py did not write (a checkpoint, a split, a meta.json, a notes file, /dev/null as root) is
    refused in one line before any timing, the file left as it was."""
    import torch
    import bench
    path = tmp_path / target
    if target == 'ckpt.pt':
        torch.save({'model': {}}, path)
    elif target == 'fifo':
        os.mkfifo(path)  # opening it to look inside would block for ever
    elif target == 'link':
        os.symlink(os.devnull, path)
    elif target == 'device':
        if os.geteuid() != 0:
            pytest.skip('making a device node needs root')
        os.mknod(path, 0o600 | stat.S_IFCHR, os.stat(os.devnull).st_rdev)
    elif target == 'dir':
        path.mkdir()
    else:
        path.write_text('{"likelihood": {}, "rows": [], "judge_name": ""}\n' if target == 'results.json' else
                        'work of hours\n')
    kind = os.lstat(path).st_mode
    before = path.read_bytes() if stat.S_ISREG(kind) else None
    with pytest.raises(SystemExit) as e:
        bench.main([f'--json={path}', f'--overwrite={overwrite}', *TINIEST])
    msg = str(e.value.code)
    assert msg.startswith('bench.py: ') and message in msg and '\n' not in msg, msg
    if target not in ('notes.txt', 'dir'):
        assert 'replace it with' not in msg  # no flag that would not help
    assert os.lstat(path).st_mode == kind and (before is None or path.read_bytes() == before)
