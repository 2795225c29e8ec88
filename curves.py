"""
Convergence curves: held-out bits/token of every family against tokens seen and against training seconds.

    python curves.py                                   # the long CPU runs (config/*_long_cpu.py, ar at 4000 too)
    python curves.py --runs="['out-ar-cpu','out-mask-cpu']" --out_dir=curves-demo

It reads what train.py logs at each evaluation (out_dir/eval_log.jsonl: the val windows scored by the family's
bound, exact for ar, and the unigram cross-entropy of the same windows), and draws one line per run with the
unigram line dashed: a curve that stays on that line has learned token frequencies and nothing of context.
Train the runs first, e.g.  for f in ar mask embed bits analog; do python train.py config/${f}_long_cpu.py; done
Writes out_dir/curves.png and out_dir/curves.json, and prints a markdown table of each run's last evaluation; an
out_dir holding files of those names that curves.py did not write (no curves.json of its own) needs overwrite=True.
"""

import os

from configurator import configure
from loggers import read_eval_log
import util
from util import save_figure, write_json

# -----------------------------------------------------------------------------------------------------
runs = ['out-ar-long-cpu', 'out-ar-long-cpu-4000', 'out-mask-long-cpu',
        'out-embed-long-cpu', 'out-bits-long-cpu', 'out-analog-long-cpu']
out_dir = 'results/curves'       # curves.png and curves.json go here
ymax = 0.0                  # upper limit of the bits/token axis (log scale); 0 -> the largest value after iteration 0
overwrite = False           # let out_dir's curves.json / curves.png replace files curves.py did not write
_config_keys = ['runs', 'out_dir', 'ymax', 'overwrite']
# -----------------------------------------------------------------------------------------------------


def read_log(out_dir):
    """The evaluations of one run, in order, one per iteration (a resumed run's rewrite keeps the last)."""
    path = os.path.join(out_dir, 'eval_log.jsonl')
    if not os.path.isfile(path):
        raise SystemExit(f"curves.py: {path} not found: train the run first (train.py writes it at every "
                         f"evaluation with eval_bound=True)")
    by_iter = {rec['iter']: rec for rec in read_eval_log(path, 'curves.py')}
    recs = [by_iter[k] for k in sorted(by_iter)]
    if not recs or 'val_bits' not in recs[-1]:
        raise SystemExit(f"curves.py: {path} has no val_bits (run trained with eval_bound=False?)")
    return recs


def draw(curves, path, ymax):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    unigram = [c['records'][0]['unigram_bits'] for c in curves]
    top = ymax or 1.2 * max(r['val_bits'] for c in curves for r in c['records'] if r['iter'] > 0)
    for ax, (key, label) in zip(axes, [('tokens', 'training tokens seen'), ('train_seconds', 'training seconds')]):
        for c in curves:
            recs = [r for r in c['records'] if r['iter'] > 0]
            line, = ax.plot([r[key] for r in recs], [r['val_bits'] for r in recs], marker='o', ms=3,
                            label=f"{c['name']} ({c['family']})")
            if all('val_bits_se' in r for r in recs):  # logs before the standard error was logged have none
                ax.fill_between([r[key] for r in recs], [r['val_bits'] - r['val_bits_se'] for r in recs],
                                [r['val_bits'] + r['val_bits_se'] for r in recs], color=line.get_color(), alpha=0.2)
        for u in sorted(set(round(u, 3) for u in unigram)):
            ax.axhline(u, color='gray', linestyle='--', linewidth=1)
        ax.set_yscale('log')  # loose early bounds and the ar line on one axis
        ax.set_ylim(0.5 * min(r['val_bits'] for c in curves for r in c['records'] if r['iter'] > 0), top)
        ax.annotate('unigram', (1, min(unigram)), xycoords=('axes fraction', 'data'), ha='right', va='bottom',
                    color='gray', fontsize=8)
        ax.set_xlabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel('val bits/token (bound, ± 1 SE band; exact for ar)')
    axes[1].legend(fontsize=8)
    save_figure(fig, path, 'held-out bits/token during training, beside the unigram model of the train split')


def se_text(rec):  # the standard error over the val windows (one draw of the bound each; for ar, windows alone)
    return f" ± {rec['val_bits_se']:.3f}" if 'val_bits_se' in rec else ""


def main(argv=None):
    c = configure({k: globals()[k] for k in _config_keys}, argv, keys=_config_keys, prog='curves.py')
    if not c['runs']:
        raise SystemExit("curves.py: runs is empty")
    util.check_output_dir(c['out_dir'], 'curves.json', ['curves.png'], 'curves.py', c['overwrite'])
    curves = []
    for run in c['runs']:
        recs = read_log(run)
        curves.append({'name': os.path.basename(os.path.normpath(run)), 'family': recs[-1].get('model_type', '?'),
                       'records': recs})
    lines = ['| run | family | iterations | tokens | train seconds | val bits/token | unigram | context gain |',
             '|---|---|---|---|---|---|---|---|']
    for cv in curves:
        r = cv['records'][-1]
        lines.append(f"| {cv['name']} | {cv['family']} | {r['iter']} | {r['tokens']:,} | {r['train_seconds']:.0f} | "
                     f"{r['val_bits']:.3f}{se_text(r)} | {r['unigram_bits']:.3f} | {r['unigram_bits'] - r['val_bits']:+.3f} |")
    os.makedirs(c['out_dir'], exist_ok=True)
    write_json(os.path.join(c['out_dir'], 'curves.json'), {'config': c, 'curves': curves})
    draw(curves, os.path.join(c['out_dir'], 'curves.png'), c['ymax'])
    print('\n'.join(lines))
    print(f"\nwrote {os.path.join(c['out_dir'], 'curves.png')} and curves.json")
    return curves


if __name__ == '__main__':
    util.run_script(main, 'curves.py')
