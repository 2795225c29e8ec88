# CPU, roadmap: context length (64, 128, 256 tokens) for ar and mask at equal tokens per step (batch x block = 512),
# so runs differ only in how much context each prediction has. Likelihood: each run on windows of its own
# length over the same test tokens. Samples: all at the shortest length (the judge's 64 tokens).
#   python sweep.py config/sweep_ctx.py
from config.sweep_common import *  # judge, evaluation, budget
from config.sweep_common import _ITERS

runs = [dict(config=f'config/{f}_cpu.py', out_dir=f'out-sweep-{f}' + ('' if L == 64 else f'-ctx{L}'),
             max_iters=_ITERS, block_size=L, batch_size=512 // L)
        for f in ('ar', 'mask') for L in (64, 128, 256)]
results_dir = 'results/sweep-ctx'
columns = ['block_size', 'batch_size']
x = 'block_size'
panels = ['bits_x', 'bits_position', 'bits_tokens', 'gen_ppl_steps']
eval_overrides = {'position_buckets': 8}  # bits/token in 8 ranges of positions: far into the window, better?
notes = ['Samples are all at the judge\'s length (64 tokens); samples at each length need a judge with the longest '
         'block_size.']
paired = ''            # each length scores windows of its own length: no window-by-window pairs
