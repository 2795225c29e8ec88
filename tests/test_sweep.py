"""Tests of sweep.py: every CPU sweep config end to end at a tiny size (train.py, evaluate.py and sample.py in
subprocesses, as a user runs them), the skip / resume rules, the checks of a sweep config, the GPU variants.

All tests share one tiny prepared dataset (real stories, ids compacted so the vocabulary-sized layers are
small) and one directory of runs, so a run two sweeps share (out-sweep-embed, the judge, ...) is trained once.

One-line mutations of sweep.py each test was checked to catch:
  end_to_end (every case)  `if done == s['max_iters']:` -> `... + 1:` (finished runs resumed, not skipped)
  end_to_end[families]     tokens without `* s['block_size']`
  end_to_end[t_values]     the settings columns of the runs table written as '?'
  end_to_end[eps_x0]       `curve = []` (eval_log.jsonl not read)
  end_to_end[ctx]          `notes_ = res['skipped']` (the config's notes dropped from results.md)
  end_to_end[diversity]    `if t == 1.0:` -> `if t != 1.0:` (sample.py's temperatures skipped)
  branches_of_a_stem       no `--init_from=resume` for a run with a checkpoint (the stem's second stage refused);
                           `'cooldown_iters': 0` dropped from stem_run (the stem cools down: other weights)
  bad_sweep_configs        `if dup:` -> `if False:` (the duplicate-out_dir case)
  gpu_variant              `base = train_config` (a run's own config file ignored)
  t_quantile               `central(theta) - (2 * p - 1)` -> `central(theta) - p` (a one-sided point)
  paired_differences       `se_eval = statistics.stdev(lks[0]['window_gain']) / ...` (seed 1's SE only);
    _by_hand               `abs(d) > t * math.sqrt(var)` -> `abs(d) > math.sqrt(var)` (or `2 * ...`);
                           `(paired_var, windows - 1)` -> `(paired_var, windows)`; `(v / k, k - 1)` -> `(v / k, k)`;
                           `[(v, k * f) ...]` -> `[(v / f, k) ...]` (more seeds without their df)
"""
import json
import math
import os
import re
import subprocess
import sys

import pytest

import sweep
from checkpoint import load_checkpoint
from conftest import compact_prepared, tinystories_documents

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root (this file is in tests/)
CPU_SWEEPS = ['families', 't_values', 'eps_x0', 'ctx', 'diversity', 'frontier']
# every tiny run: 1 block of width 32, 2 windows a step, 2 steps (each sweep keeps its own block sizes)
TINY = dict(n_layer=1, n_head=2, n_embd=32, batch_size=2, max_iters=2, warmup_iters=1, eval_interval=2, eval_iters=1,
            log_interval=1, device='cpu', dtype='float32', peak_flops=1e11, tensorboard_log=False)
TINY_EVAL = dict(steps=[2], num_samples=2, sample_batch_size=2, mc_samples=1, mc_samples_by_family={}, max_windows=4,
                 eval_batch_size=4)


@pytest.fixture(scope='module')
def shared(tmp_path_factory):
    """The prepared stories (400, a tenth each for val and test) and the directory every test's runs go to."""
    root = tmp_path_factory.mktemp('sweep')
    text = root / 'stories.txt'
    text.write_text('\n<|endoftext|>\n'.join(tinystories_documents(limit=400)), encoding='utf-8')
    data_dir = str(root / 'data')
    subprocess.run([sys.executable, 'prepare.py', f'--input={text}', f'--out_dir={data_dir}', '--num_proc=1',
                    '--val_frac=0.1', '--test_frac=0.1'], cwd=ROOT, check=True, capture_output=True)
    meta = compact_prepared(data_dir)
    os.environ['OMP_NUM_THREADS'] = '1'  # the subprocesses: tiny models, one thread each
    return {'runs': str(root / 'runs'), 'root': root,
            'train': {**TINY, 'data_dir': data_dir, 'vocab_size': meta['vocab_size']}}


def run_sweep(shared, config, results_dir, *extra):
    lines = []
    res = sweep.main([config, f"--train_overrides={shared['train']!r}", f"--eval_overrides={TINY_EVAL!r}",
                      f"--run_root={shared['runs']}", f"--results_dir={results_dir}", '--jobs=2', *extra],
                     log=lines.append)
    return res, '\n'.join(lines)


def table_rows(md, section):
    """The data rows of the markdown table under '## <section>'."""
    part = md.split(f'## {section}')[1].split('\n## ')[0]
    return [line for line in part.splitlines() if line.startswith('| ') and not line.startswith('| run ')]


@pytest.mark.slow
@pytest.mark.parametrize('name', CPU_SWEEPS)
def test_sweep_end_to_end(shared, name, monkeypatch):
    config = f'config/sweep_{name}.py'
    results_dir = str(shared['root'] / f'results-{name}')
    extra = ['--temperatures=[0.5, 1.0]'] if name == 'diversity' else []  # two of the grid's temperatures
    if name == 'frontier':  # the tiny evaluation, with the frontier's own sampler settings
        from configurator import configure
        ns = {k: sweep._DEFAULTS[k] for k in sweep._config_keys}
        configure(ns, [config], keys=sweep._config_keys, verbose=False)
        extra = [f"--eval_overrides={dict(TINY_EVAL, sample_settings=ns['eval_overrides']['sample_settings'])!r}"]
    res, _ = run_sweep(shared, config, results_dir, *extra)
    n = len(res['runs'])
    assert n == len(res['sweep']['runs']) and n > 1
    for f in ('results.json', 'results.md', 'sweep.png'):
        assert os.path.getsize(os.path.join(results_dir, f)) > 0, f
    with open(os.path.join(results_dir, 'results.md')) as f:
        md = f.read()
    # the code that scored it, as git names it (None where the sources are no git checkout)
    git = subprocess.run(['git', '-C', ROOT, 'describe', '--always', '--dirty'], capture_output=True, text=True)
    assert res['code'] == (git.stdout.strip() if git.returncode == 0 else None)
    assert f"Scored by the code at `{res['code'] or 'unknown'}`" in md
    rows = [r for r in table_rows(md, 'Runs') if not r.startswith('| unigram')]
    assert [r.split(' | ')[0][2:] for r in rows] == [r['name'] for r in res['runs']], "one table row per run"
    assert json.load(open(os.path.join(results_dir, 'results.json')))['runs'][0]['name'] == res['runs'][0]['name']
    with open(os.path.join(results_dir, 'sweep.png'), 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    for r in res['runs']:
        assert r['iters'] == 2 and r['likelihood'] is not None
        lk = r['likelihood']
        if not lk['exact']:  # every Monte Carlo estimate in the table carries its standard error
            assert f"{lk['bits']:.3f} ± {lk['bits_se']:.3f}" in md
    for s in res['samples']:
        assert f"± {s['entropy_se']:.2f}" in md

    # what each sweep is for
    if name == 'families':  # equal tokens: iterations x batch x block for every family, and their curves
        assert {r['model_type'] for r in res['runs']} == {'embed', 'bits', 'analog', 'mask', 'ar'}
        assert all(r['tokens'] == 2 * 2 * 64 and r['curve'][-1]['tokens'] == r['tokens'] for r in res['runs'])
        assert all(s.get('gen_bits') is not None for s in res['samples'])  # the sweep's own judge scored them
        assert sorted(r['settings']['seed'] for r in res['runs']) == [1337] * 5 + [1338] * 5  # two seeds each
        assert [g['seeds'] for g in res['comparisons']['groups'].values()] == [2] * 5
        assert len(res['comparisons']['pairs']) == 10 and '## Seeds' in md and '## Paired differences' in md
    if name == 't_values':  # T is a column, and each run was trained with its T (and continuous time for one)
        assert sorted(r['settings']['T'] for r in res['runs']) == [100, 100, 250, 250] + [1000] * 4 + [4000, 4000]
        assert all(f"| {r['settings']['T']} | {r['settings']['continuous_time']} |" in row
                   for r, row in zip(res['runs'], rows))
        args = [load_checkpoint(r['out_dir'])[1]['model_args'] for r in res['runs']]
        trained = {(a['model_type'], a['T'], a['continuous_time']) for a in args}
        assert trained == {(f, T, False) for f in ('embed', 'bits') for T in (100, 250, 1000, 4000)} | \
            {('embed', 1000, True), ('bits', 1000, True)}
    if name == 'eps_x0':
        assert [(r['model_type'], r['settings']['predict']) for r in res['runs']] == \
            [('embed', 'x0'), ('embed', 'eps'), ('analog', 'x0'), ('analog', 'eps')]
        assert all(len(r['curve']) >= 2 for r in res['runs'])  # the training curves (iterations 0 and 2)
    if name == 'ctx':  # bits/token per length, each on windows of its own length
        assert [r['settings']['block_size'] for r in res['runs']] == [64, 128, 256] * 2
        assert [r['likelihood']['tokens'] for r in res['runs']] == [4 * L for L in (64, 128, 256)] * 2
        for r in res['runs']:  # bits/token per range of positions, within each run's own window
            by_pos = r['likelihood']['by_position']
            assert by_pos[0]['positions'][0] == 0 and by_pos[-1]['positions'][1] == r['settings']['block_size']
    if name == 'frontier':  # every family at its default and its other settings, against NFE, in one picture
        rows = {(s['family'], tuple(sorted(s['options'].items()))) for s in res['samples']}
        assert ('embed', ()) in rows and ('embed', (('clamp', False), ('eta', 0.0))) in rows
        assert ('embed', (('clamp', True), ('eta', 1.0))) not in rows  # embed's default: sampled once, as {}
        assert {('ar', ()), ('ar', (('temperature', 0.8),)), ('ar', (('temperature', 0.3),))} <= rows
        assert {s['temperature'] for s in res['samples'] if s['family'] == 'ar'} == {1.0, 0.8, 0.3}
        assert all(s['nfe'] > 0 and s['seconds'] > 0 for s in res['samples'])
    if name == 'diversity':  # the frontier: each run at temperature 0.5 (sample.py) and 1.0 (evaluate.py)
        temps = {(s['name'], s['temperature']) for s in res['samples']}
        assert temps == {(r['name'], t) for r in res['runs'] for t in (0.5, 1.0)}
        assert all(s['gen_bits'] is not None and s['entropy'] > 0 for s in res['samples'])

    # a second invocation trains nothing and reuses the evaluation
    res2, log = run_sweep(shared, config, results_dir, *extra)
    assert [r['status'] for r in res2['runs']] == ['skipped'] * n
    assert ': training: ' not in log and 'scoring: ' not in log and 'sampling: ' not in log
    assert [r['likelihood'] for r in res2['runs']] == [r['likelihood'] for r in res['runs']]

    # --retabulate makes the tables and the picture (the sweep's own panels and x) again from results.json alone
    if name == 'ctx':
        for f in ('results.md', 'sweep.png'):
            os.remove(os.path.join(results_dir, f))
        drawn, real_draw = [], sweep.draw
        monkeypatch.setattr(sweep, 'draw', lambda *a: drawn.append((sweep.panels, sweep.x)) or real_draw(*a))
        sweep.main([f'--retabulate={results_dir}'], log=lambda *a: None)
        assert drawn == [(['bits_x', 'bits_position', 'bits_tokens', 'gen_ppl_steps'], 'block_size')]
        with open(os.path.join(results_dir, 'results.md')) as f:
            assert f.read() == md
        with open(os.path.join(results_dir, 'sweep.png'), 'rb') as f:
            assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def _run(name, family, seed, gains, se_draws=None):
    lk = {'window_gain': gains, 'context_gain': sum(gains) / len(gains), 'bits': 8 - sum(gains) / 4}
    return {'name': name, 'model_type': family, 'settings': {'seed': seed},
            'likelihood': {**lk, **({} if se_draws is None else {'se_draws': se_draws})}}


def test_t_quantile_against_closed_forms():
    """Student's t, two-sided 95%: df = 1 is Cauchy's, tan(0.475 pi); df = 2 has F(t) = 1/2 + t / (2 sqrt(2 + t^2)),
    so t = sqrt(2 x 0.95^2 / (1 - 0.95^2)); df = 3 has F(t) = 1/2 + (t / (sqrt(3) (1 + t^2 / 3)) + atan(t / sqrt(3)))
    / pi; a large df is the normal's 1.95996."""
    assert sweep.t_quantile(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-6)
    assert sweep.t_quantile(0.975, 2) == pytest.approx(math.sqrt(2 * 0.95 ** 2 / (1 - 0.95 ** 2)), rel=1e-6)
    t = sweep.t_quantile(0.975, 3)
    assert 0.5 + (t / (math.sqrt(3) * (1 + t * t / 3)) + math.atan(t / math.sqrt(3))) / math.pi == pytest.approx(0.975)
    assert sweep.t_quantile(0.975, 1e6) == pytest.approx(1.959966, abs=1e-5)
    assert sweep.t_quantile(0.975, math.inf) == pytest.approx(1.959964, abs=1e-6)


def test_seed_groups_and_paired_differences_by_hand(monkeypatch):
    """Four test windows, three settings. embed: two seeds, gains [1, 2, 3, 4] and [2, 4, 4, 6] (not parallel, so
    the seeds' average differs from either seed's pattern); bits: [0, 1, 2, 3] twice; mask: one seed, [3, 5, 4, 6].
    By hand: embed's seed-averaged gains [1.5, 3, 3.5, 5], mean 3.25, variance 6.25 / 3, SE over windows
    sqrt(6.25 / 12) = 0.7217; seed means 2.5 and 4, seed SD 1.0607; SE of the mean sqrt(6.25 / 12 + 1.125 / 2).
    embed - bits = [1.5, 2, 1.5, 2]: 1.75, paired SE sqrt(1 / 48) = 0.1443, embed's seed term 1.125 / 2 = 0.5625
    (bits' is 0): SE 0.7638, 2.29 SE. Welch: df = 0.5833^2 / (0.02083^2 / 3 + 0.5625^2 / 1) = 1.075, so t ~ 11:
    not resolved (a 2 SE or 1 SE rule would resolve it). Only more seeds can resolve it (the smallest multiple
    found here by scanning): parts seeds 0.5625, draws 2 x 0.1^2 / 4 = 0.005 (each embed seed's se_draws 0.1,
    bits' 0), windows 0.02083 - 0.005.
    bits - mask = [-3, -4, -2, -3]: -3, paired SE sqrt(2 / 3 / 4), no seed term from mask (one seed) and a zero
    one from bits: df = 3 (the windows'), t = 3.18, 7.3 SE: mask is better, flagged as one seed."""
    monkeypatch.setattr(sweep, 'paired', 'all')
    res = {'columns': ['seed'], 'runs': [
        _run('a1', 'embed', 1, [1, 2, 3, 4], 0.1), _run('a2', 'embed', 2, [2, 4, 4, 6], 0.1),
        _run('b1', 'bits', 1, [0, 1, 2, 3], 0.0), _run('b2', 'bits', 2, [0, 1, 2, 3], 0.0),
        _run('c1', 'mask', 1, [3, 5, 4, 6], 0.0)]}
    cmp = sweep.comparisons(res)
    a = cmp['groups']['embed']
    assert a['runs'] == ['a1', 'a2'] and a['seeds'] == 2 and a['gain'] == pytest.approx(3.25)
    assert a['se_eval'] == pytest.approx(math.sqrt(6.25 / 12)) and a['seed_sd'] == pytest.approx(math.sqrt(1.125))
    assert a['se'] == pytest.approx(math.sqrt(6.25 / 12 + 0.5625)) and a['se_draws'] == pytest.approx(math.sqrt(0.02) / 2)
    assert cmp['groups']['bits']['seed_sd'] == 0 and cmp['groups']['mask']['seed_sd'] is None
    pairs = {(p['a'], p['b']): p for p in cmp['pairs']}
    assert set(pairs) == {('embed', 'bits'), ('embed', 'mask'), ('bits', 'mask')}
    ab, bc = pairs[('embed', 'bits')], pairs[('bits', 'mask')]
    var = 1 / 48 + 0.5625
    assert ab['diff'] == pytest.approx(1.75) and ab['se_paired'] == pytest.approx(math.sqrt(1 / 48))
    assert ab['se'] == pytest.approx(math.sqrt(var))
    assert ab['df'] == pytest.approx(var ** 2 / ((1 / 48) ** 2 / 3 + 0.5625 ** 2)) and ab['t'] > 1.75 / ab['se'] > 2
    assert ab['t'] == sweep.t_quantile(0.975, ab['df']) and not ab['resolved'] and not ab['one_seed']
    assert ab['parts'] == pytest.approx({'seeds': 0.5625, 'draws': 0.005, 'windows': 1 / 48 - 0.005})
    def resolved_with(f):  # f times the seeds: embed's seed term 1.125 / (2 f) with 2 f - 1 df, bits' stays 0
        var, seed = 1 / 48 + 1.125 / (2 * f), 1.125 / (2 * f)
        return 1.75 > sweep.t_quantile(0.975, var ** 2 / ((1 / 48) ** 2 / 3 + seed ** 2 / (2 * f - 1))) * math.sqrt(var)
    assert ab['needed'] == {'seeds': next(f for f in range(2, 10 ** 4) if resolved_with(f)), 'draws': None,
                            'windows': None}
    assert bc['diff'] == pytest.approx(-3) and bc['se'] == pytest.approx(math.sqrt(2 / 12))
    assert bc['df'] == pytest.approx(3)
    assert bc['resolved'] and bc['one_seed'] and bc['needed'] is None
    md = '\n'.join(sweep.comparison_markdown(cmp))
    assert (f"| embed | bits | +1.750 | 0.144 | 0.764 | 1.1 | +2.29 | {ab['t']:.2f} | not resolved at this budget "
            f"(~{ab['needed']['seeds']}x the seeds alone would resolve it; more draws or windows alone cannot) |") in md
    assert '| bits | mask | -3.000 | 0.408 | 0.408 | 3.0 | -7.35 | 3.18 | mask is better; one seed: no training' in md
    assert '| embed | 2 | 4.750 (5.500, 4.000) | +3.250 | 0.722 | 1.061 | 1.041 |' in md
    for r in res['runs']:  # results scored before the draws' part was recorded: draws and windows together
        del r['likelihood']['se_draws']
    ab = {(p['a'], p['b']): p for p in sweep.comparisons(res)['pairs']}[('embed', 'bits')]
    assert ab['parts'] == pytest.approx({'seeds': 0.5625, 'windows with draws': 1 / 48})
    monkeypatch.setattr(sweep, 'paired', 'within')  # pairs within a family only: none here
    assert sweep.comparisons(res)['pairs'] == []
    assert sweep.comparisons({**res, 'sweep': {'paired': 'all'}})['pairs']  # a results file's own setting wins
    # two one-seed settings: no seed spread on either side, so the table shows none ('-'), only the paired SE:
    # [3, 5, 4, 6] - [4, 5, 5, 6] = [-1, 0, -1, 0], mean -0.5, SE sqrt(1 / 3 / 4) = 0.289
    one = {'columns': ['seed'], 'runs': [_run('c1', 'mask', 1, [3, 5, 4, 6]), _run('d1', 'ar', 1, [4, 5, 5, 6])]}
    md = '\n'.join(sweep.comparison_markdown(sweep.comparisons({**one, 'sweep': {'paired': 'all'}})))
    assert '| mask | ar | -0.500 | 0.289 | - | 3.0 | -1.73 | 3.18 | not resolved' in md, md


def test_convergence_chooses_on_val_and_reads_budgets_log_linearly():
    """Budgets of 1, 2 and 4 epochs (100 tokens each) of ar and mask, one seed, four test windows. ar's test gains
    1.0, 2.0, 1.5 (it overfits), val bits 7.0, 6.0, 6.5: best at 2 epochs. mask's gains 0.5, 1.5, 2.5, val bits 7.5,
    5.4, 5.5: chosen on val, its best is 2 epochs although test is lowest at 4. By hand: mask's gain reaches 1 bit
    between 100 and 200 tokens, at 100 sqrt(2) in log tokens (1.41 epochs), 2 bits at 200 sqrt(2); its test bits
    reach ar's best (6.0) at 200 sqrt(2) tokens, 1.41x ar's; at 4 epochs it leads ar's 4-epoch run by 1.0 bit.
    Beside each budget, the training objective on train / val at its last iteration, from its eval_log curve (none
    for a run whose log has no evaluation there). Red if the best is chosen on test, the crossings are read linearly
    in tokens, a level held at the first budget is read at a later rise through it or shown without its "≤", or the
    losses are read from the curve's last evaluation whatever its iteration (`if p.get('iter') ==
    run.get('iters')` dropped in final_losses), or train and val swapped."""
    off_ar, off_mask = [0.1, -0.1, 0.05, -0.05], [0.2, -0.1, 0.0, -0.1]
    curves = {('ar', 1): [{'iter': 0, 'train': 9.0, 'val': 9.0}, {'iter': 1, 'train': 3.5, 'val': 3.6}],
              ('ar', 2): [{'iter': 0, 'train': 9.0, 'val': 9.0}, {'iter': 2, 'train': 3.0, 'val': 3.4}],
              ('ar', 4): [{'iter': 2, 'train': 3.0, 'val': 3.4}]}  # no evaluation at its last iteration

    def run(fam, epochs, gain, val, off):
        r = _run(f'{fam}{epochs}', fam, 1, [gain + o for o in off])
        r['likelihood']['bits'] = 8 - gain
        return {**r, 'settings': {'seed': 1, 'max_iters': epochs}, 'tokens': 100 * epochs, 'train_seconds': 10.0 * epochs,
                'likelihood_by_split': {'val': {'bits': val}}, 'iters': epochs, 'curve': curves.get((fam, epochs), [])}
    res = {'columns': ['seed', 'max_iters'], 'sweep': {'epoch_tokens': 100, 'score': True, 'paired': ''},
           'runs': [run('ar', 1, 1.0, 7.0, off_ar), run('ar', 2, 2.0, 6.0, off_ar), run('ar', 4, 1.5, 6.5, off_ar),
                    run('mask', 1, 0.5, 7.5, off_mask), run('mask', 2, 1.5, 5.4, off_mask),
                    run('mask', 4, 2.5, 5.5, off_mask)]}
    conv = sweep.convergence(res)
    assert conv['ar_best']['tokens'] == 200 and conv['ar_best']['bits'] == pytest.approx(6.0)
    mask = conv['families']['mask']
    assert mask['best']['tokens'] == 200 and mask['best']['bits'] == pytest.approx(6.5)
    assert mask['gain_tokens'][1] == pytest.approx(100 * math.sqrt(2)) and mask['gain_tokens'][3] is None
    assert mask['gain_tokens'][2] == pytest.approx(200 * math.sqrt(2))
    assert mask['match_ar_best']['multiplier'] == pytest.approx(math.sqrt(2))
    assert mask['vs_ar_best']['diff'] == pytest.approx(-0.5)
    last = mask['vs_ar'][-1]
    assert last['tokens'] == 400 and last['diff'] == pytest.approx(1.0) and last['resolved']
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    sweep.PANELS['budgets_epochs'](ax, res)  # the picture reads what the tables read: x in epochs
    assert list(ax.lines[0].get_xdata()) == [1, 2, 4]
    plt.close(fig)
    fig, ax = plt.subplots()
    sweep.PANELS['losses_epochs'](ax, res)  # ar's val and train lines at the budgets that have them; mask has none
    assert [list(line.get_ydata()) for line in ax.lines] == [[3.6, 3.4], [3.5, 3.0]]
    plt.close(fig)
    md = '\n'.join(sweep.convergence_markdown(conv))
    assert '| mask | 2 | 5.400 | 6.500 |' in md and '| 1.41 / 2.83 / - | 2.83 (1.4x) |' in md
    assert '| ≤ 1 / 2 / - | - |' in md  # ar's gain is 1 bit at its first budget already: reached at or before it
    assert sweep.log_crossing([(1, 3.0), (2, 0.0), (4, 3.0)], 1.0) == 1  # the first reach, not a later rise
    rows = {tuple(line.split(' | ')[:2]): line for line in md.split('## Best budgets')[0].splitlines()}
    assert rows[('| ar', '1')].endswith('| 3.500 / 3.600 |') and rows[('| ar', '2')].endswith('| 3.000 / 3.400 |')
    assert rows[('| ar', '4')].endswith('| - |') and rows[('| mask', '1')].endswith('| - |')


def test_a_finished_run_with_the_datas_vocabulary_is_recognised(tmp_path):
    """vocab_size = 0 (the configs' default) means the data's: a checkpoint that holds the data's size is this run's;
    any other setting that differs, or a vocab_size asked for explicitly, is another run's model."""
    import torch
    torch.save({'model_args': {'vocab_size': 7989, 'n_layer': 1}, 'iter_num': 5, 'train_seconds': 1.5},
               tmp_path / 'ckpt.pt')
    assert sweep.checkpoint_iter(str(tmp_path), {'vocab_size': 0, 'n_layer': 1}) == (5, 1.5, None)
    for settings, words in [({'vocab_size': 0, 'n_layer': 2}, 'n_layer=1'), ({'vocab_size': 50257}, 'vocab_size=7989')]:
        with pytest.raises(SystemExit) as e:
            sweep.checkpoint_iter(str(tmp_path), settings)
        assert "holds another run's model" in str(e.value.code) and words in str(e.value.code)


def test_parallel_jobs_split_the_cores(monkeypatch):
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    monkeypatch.setattr(os, 'cpu_count', lambda: 8)
    monkeypatch.setattr(sweep, 'jobs', 2)
    assert sweep.train_env()['OMP_NUM_THREADS'] == '4'
    monkeypatch.setattr(sweep, 'jobs', 1)
    assert 'OMP_NUM_THREADS' not in sweep.train_env()


def test_branches_of_a_stem_are_the_straight_runs_of_their_length(shared, tmp_path):
    """Warmup-stable-decay branches (branch_from): the stem trained in stages to each branch point, each branch cooled
    down from its copy, give the very weights of a run of that length trained straight through; a second sweep finds
    them all finished."""
    import torch
    wsd = dict(config='config/mask_cpu.py', block_size=16, lr_schedule='wsd', cooldown_iters=2)
    cfg = tmp_path / 'sweep_branches.py'
    cfg.write_text(f"runs = [dict(out_dir='b6', branch_from='stem', max_iters=6, **{wsd!r}),\n"
                   f"        dict(out_dir='b4', branch_from='stem', max_iters=4, **{wsd!r}),\n"
                   f"        dict(out_dir='straight6', max_iters=6, **{wsd!r})]\n"
                   "score = False\npanels = ['bits_tokens']\n")
    train = {k: v for k, v in shared['train'].items() if k != 'max_iters'}
    where = {**shared, 'runs': str(tmp_path / 'runs'), 'train': train}
    res, log = run_sweep(where, str(cfg), str(tmp_path / 'r1'))
    assert 'b4: branched from' in log and 'b6: branched from' in log and [r['iters'] for r in res['runs']] == [6, 4, 6]
    weights = {d: load_checkpoint(os.path.join(where['runs'], d))[0].state_dict() for d in ('b6', 'straight6')}
    assert all(torch.equal(v, weights['straight6'][k]) for k, v in weights['b6'].items())
    stem = torch.load(os.path.join(where['runs'], 'stem', 'ckpt.pt'), weights_only=True)
    assert stem['iter_num'] == 4 and stem['config']['cooldown_iters'] == 0
    # the stem's second stage resumed the first (its first evaluations kept, not trained again from scratch)
    assert 'stem: resuming from iteration 2' in log
    with open(os.path.join(where['runs'], 'stem', 'eval_log.jsonl')) as f:
        assert [json.loads(line)['iter'] for line in f] == [0, 2, 4]
    again, _ = run_sweep(where, str(cfg), str(tmp_path / 'r2'))
    assert [r['status'] for r in again['runs']] == ['skipped'] * 3
    # train=False scores what has finished, on val and test, and names the run left out (b8: never trained)
    cfg.write_text(cfg.read_text().replace("runs = [", f"runs = [dict(out_dir='b8', branch_from='stem', max_iters=8, "
                                                       f"**{wsd!r}), ").replace('score = False', 'score = True'))
    part, log = run_sweep(where, str(cfg), str(tmp_path / 'r3'), '--train=False', "--splits=['val','test']")
    assert [r['name'] for r in part['runs']] == ['b6', 'b4', 'straight6'] and 'training' not in log
    assert any('b8: not finished yet, left out (train=False)' in n for n in part['skipped'])
    val, test = part['runs'][0]['likelihood_by_split']['val'], part['runs'][0]['likelihood']
    assert val['scored']['split'] == 'val' and test['scored']['split'] == 'test' and val['bits'] != test['bits']
    md = open(tmp_path / 'r3' / 'results.md').read()
    assert '| val bits/token | test bits/token |' in md and f"{val['bits']:.3f} ± " in md


@pytest.mark.parametrize('args, words', [
    (["--runs=[]"], 'runs is empty'),
    (["--runz=[]"], "unknown config key 'runz'"),
    (["--runs=[{'out_dir': 'a/x'}, {'out_dir': 'b/x'}]"], "duplicate out_dir 'x'"),
    (["--runs=[{'out_dir': 'a', 'n_layerz': 2}]"], "unknown config key 'n_layerz'"),
    (["--runs=[{'T': 100}]"], 'its own out_dir'),
    (["--runs=[{'out_dir': 'a'}]", "--judge={'out_dir': 'j'}"], "judge must be an 'ar' run"),
    (["--runs=[{'out_dir': 'a'}]", "--panels=['bits_y']"], "unknown panel 'bits_y'"),
    (["--runs=[{'out_dir': 'a'}]", "--eval_overrides={'ckpts': ['a']}"], 'sets ckpts'),
])
def test_bad_sweep_configs_fail_in_one_line(args, words, tmp_path):
    safe = f"--train_overrides={{'data_dir': '{tmp_path}/none', 'max_iters': 1}}"  # if a check is missed: no real run
    with pytest.raises(SystemExit) as e:
        sweep.main([*args, safe, f'--run_root={tmp_path}', f'--results_dir={tmp_path}'], log=lambda *a: None)
    msg = str(e.value.code)
    assert words in msg and msg.startswith(('sweep.py: ', 'train.py: ')) and '\n' not in msg, msg
    assert not os.listdir(tmp_path), "nothing may run before the config is checked"


@pytest.mark.parametrize('name', CPU_SWEEPS)
def test_gpu_variant_is_the_cpu_sweep_at_gpu_scale(name, monkeypatch):
    """config/sweep_<name>.py config/sweep_gpu.py: the same runs and judge on the DiT-B configs, out_dirs and a
    results_dir of their own, the GPU evaluation."""
    from configurator import configure
    monkeypatch.setattr(sweep, 'train_overrides', {})  # (an earlier test's sweep.main() leaves its own)
    cpu, gpu = ({k: sweep._DEFAULTS[k] for k in sweep._config_keys} for _ in range(2))
    configure(cpu, [f'config/sweep_{name}.py'], keys=sweep._config_keys, verbose=False)
    configure(gpu, [f'config/sweep_{name}.py', 'config/sweep_gpu.py'], keys=sweep._config_keys, verbose=False)
    assert len(gpu['runs']) == len(cpu['runs']) and gpu['results_dir'] == cpu['results_dir'] + '-gpu'
    assert gpu['eval_overrides']['num_samples'] == 256 and gpu['judge']['out_dir'] == 'out-sweep-judge-gpu'
    assert sweep.train_settings(gpu['judge'])[0]['model_type'] == 'ar'
    for c, g in zip(cpu['runs'], gpu['runs']):
        assert g['out_dir'] == c['out_dir'] + '-gpu' and re.search(r'(_gpu|dit_tinystories)\.py$', g['config'])
        s, _ = sweep.train_settings(g)
        assert (s['n_layer'], s['n_embd']) == (12, 768)
        assert all(s[k] == v for k, v in g.items() if k not in ('config', 'block_size', 'batch_size', 'max_iters'))


def test_another_scripts_output_is_refused_even_with_overwrite(tmp_path):
    d = tmp_path / 'results'
    d.mkdir()
    (d / 'results.json').write_text('{"likelihood": {}, "rows": [], "judge_name": ""}')  # evaluate.py's
    with pytest.raises(SystemExit) as e:
        sweep.main(["--runs=[{'out_dir': 'a'}]", f'--run_root={tmp_path}', f'--results_dir={d}', '--overwrite=True'],
                   log=lambda *a: None)
    assert str(e.value.code) == (f"sweep.py: '{d / 'results.json'}' (in results_dir='{d}') is evaluate.py's "
                                 f"results.json; sweep.py never writes over one, not even with --overwrite=True: "
                                 f"choose another path")


@pytest.mark.parametrize('name, content, words', [
    ('results.json', '{"table": "of hours"}',
     "(in results_dir='{d}') exists and is not sweep.py's own results.json; choose another path, or replace it with "
     "--overwrite=True"),
    ('results.md', '# notes of hours\n', "(in results_dir='{d}') exists and is not sweep.py's own results.md"),
])
def test_results_dir_files_it_did_not_write_are_refused_before_any_run(name, content, words, tmp_path):
    d = tmp_path / 'results'
    d.mkdir()
    (d / name).write_text(content)
    safe = f"--train_overrides={{'data_dir': '{tmp_path}/none', 'max_iters': 1}}"
    with pytest.raises(SystemExit) as e:
        sweep.main(["--runs=[{'out_dir': 'a'}]", safe, f'--run_root={tmp_path}', f'--results_dir={d}'],
                   log=lambda *a: None)
    msg = str(e.value.code)
    assert msg.startswith(f"sweep.py: '{d / name}' " + words.replace('{d}', str(d))) and '\n' not in msg, msg
    assert (d / name).read_text() == content and sorted(os.listdir(tmp_path)) == ['results']
    with pytest.raises(SystemExit) as e:  # with --overwrite=True the sweep goes on (to the missing data here)
        sweep.main(["--runs=[{'out_dir': 'a'}]", safe, f'--run_root={tmp_path}', f'--results_dir={d}',
                    '--overwrite=True'], log=lambda *a: None)
    assert 'overwrite' not in str(e.value.code), e.value.code


# ---------------------------------------------------------------- what sweep.py reuses, and what it must not

def test_a_run_trained_with_other_settings_is_not_finished(tmp_path):
    """Every setting that changes the trained weights is compared, not only model_args: a changed learning_rate
    means the run is trained again."""
    import train
    s, _ = sweep.train_settings({'out_dir': str(tmp_path / 'a'), 'config': 'config/mask_cpu.py', 'device': 'cpu'})
    stored = dict(s)
    train.check_settings(stored, 0, 1)  # as train.py stores it: the derived settings filled in
    assert sweep.training_changes(stored, s) == []
    assert sweep.training_changes(stored, {**s, 'eval_interval': 7, 'max_iters': s['max_iters'] + 5}) == []
    changes = sweep.training_changes(stored, {**s, 'learning_rate': 0.125})
    assert f"learning_rate={s['learning_rate']!r} -> 0.125" in changes, changes
    assert sweep.training_changes(None, s) == ['its checkpoint stores no training config']
    # a checkpoint from before a setting existed trained as its default: finished, unless the run asks otherwise
    older = {k: v for k, v in stored.items() if k not in ('lr_schedule', 'cooldown_iters')}
    assert sweep.training_changes(older, s) == []
    assert sweep.training_changes(older, {**s, 'lr_schedule': 'wsd'}) == ["lr_schedule='cosine' -> 'wsd'"]


@pytest.mark.parametrize('kind, words', [
    ('truncated', 'was not loaded: it is not a readable PyTorch checkpoint'),
    ('code', 'was not loaded: it is a pickle that calls posix.system when unpickled'),
])
def test_a_run_checkpoint_that_does_not_load_is_one_line(tmp_path, kind, words):
    import torch
    from test_sample import _Payload
    path = tmp_path / 'ckpt.pt'
    torch.save({'model_args': {}, 'model': _Payload(tmp_path / 'ran') if kind == 'code' else torch.zeros(1000)}, path)
    if kind == 'truncated':
        path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(SystemExit) as e:
        sweep.checkpoint_iter(str(tmp_path), {})
    msg = str(e.value.code)
    assert msg.startswith(f'sweep.py: {path} ') and words in msg and '\n' not in msg, msg
    assert 'weights_only=False' not in msg and not (tmp_path / 'ran').exists()


def test_a_launcher_typo_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, 'launcher', 'torchrn --standalone --nproc_per_node=2')
    monkeypatch.setattr(sweep, 'train_overrides', {})
    with pytest.raises(SystemExit) as e:
        sweep.train_run({'out_dir': str(tmp_path / 'a'), 'config': 'config/mask_cpu.py'}, log=lambda *a: None)
    assert str(e.value.code).startswith("sweep.py: cannot start 'torchrn' (launcher='torchrn --standalone"), e.value.code


def test_a_score_is_reused_only_for_the_checkpoints_and_settings_it_was_made_from(tmp_path, monkeypatch):
    """A retrained run kept its predecessor's scores ('results.json: up to date, reused': 13.036 bits listed,
    11.373 measured): the key held the iterations, not the checkpoint files."""
    calls, lines = [], []

    def fake_evaluate(cmd, **kw):
        out = next(a.split('=', 1)[1] for a in cmd if a.startswith('--out_dir='))
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, 'results.json'), 'w') as f:
            json.dump({'call': len(calls)}, f)
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, '', '')
    monkeypatch.setattr(sweep.subprocess, 'run', fake_evaluate)
    monkeypatch.setattr(sweep, 'results_dir', str(tmp_path / 'results'))
    monkeypatch.setattr(sweep, 'eval_config', '')
    monkeypatch.setattr(sweep, 'eval_overrides', {})
    runs = [str(tmp_path / n) for n in ('a', 'b')]
    for d in runs:
        os.makedirs(d)
        with open(os.path.join(d, 'ckpt.pt'), 'wb') as f:
            f.write(b'weights')
    assert sweep.run_evaluate(runs, '', lines.append)[0] == {'call': 0}
    assert sweep.run_evaluate(runs, '', lines.append)[0] == {'call': 0} and 'reused' in lines[-1]
    with open(os.path.join(runs[1], 'ckpt.pt'), 'wb') as f:  # retrained: same size, a new file
        f.write(b'WEIGHTS')
    os.utime(os.path.join(runs[1], 'ckpt.pt'), ns=(1, 10 ** 18))
    assert sweep.run_evaluate(runs, '', lines.append)[0] == {'call': 1}
    assert any(f'not reused, changed since: {runs[1]}/ckpt.pt' in line for line in lines), lines
    monkeypatch.setattr(sweep, 'eval_overrides', {'num_samples': 3})
    assert sweep.run_evaluate(runs, '', lines.append)[0] == {'call': 2}
    assert any('changed since: the evaluation settings' in line for line in lines), lines


@pytest.mark.slow
def test_a_changed_training_setting_retrains_the_run(shared, tmp_path):
    cfg = tmp_path / 'sweep_one.py'
    cfg.write_text("runs = [dict(config='config/mask_cpu.py', out_dir='out-lr', block_size=16)]\n"
                   "score = False\npanels = ['bits_tokens']\n")
    where = {**shared, 'runs': str(tmp_path / 'runs')}
    assert run_sweep(where, str(cfg), str(tmp_path / 'r1'))[0]['runs'][0]['status'] == 'trained'
    res, log = run_sweep({**where, 'train': {**shared['train'], 'learning_rate': 1e-4}}, str(cfg),
                         str(tmp_path / 'r2'))
    assert res['runs'][0]['status'] == 'retrained' and 'learning_rate=' in log and '-> 0.0001' in log, log
    assert load_checkpoint(os.path.join(where['runs'], 'out-lr'))[1]['config']['learning_rate'] == 1e-4
    res, _ = run_sweep({**where, 'train': {**shared['train'], 'learning_rate': 1e-4}}, str(cfg), str(tmp_path / 'r3'))
    assert res['runs'][0]['status'] == 'skipped'
