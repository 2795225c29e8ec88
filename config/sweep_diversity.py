# CPU, roadmap: sample diversity against the autoregressive baseline: entropy, distinct-n and gen-PPL against the
# sampling temperature (ar and mask; sample.py) and against steps (mask; evaluate.py), drawn as a
# quality-diversity frontier: one line per run and step count across temperatures.
#   python sweep.py config/sweep_diversity.py
from config.sweep_common import *  # judge, evaluation, budget
from config.sweep_common import _ITERS

runs = [dict(config=f'config/{f}_cpu.py', out_dir=f'out-sweep-{f}', max_iters=_ITERS) for f in ('ar', 'mask')]
results_dir = 'results/sweep-diversity'
temperatures = [0.5, 0.7, 0.85, 1.0, 1.2]
panels = ['frontier', 'gen_ppl_steps', 'entropy_steps']
notes = ['Temperature 1.0 rows are evaluate.py\'s (tok/s and NFE measured there); the others are sample.py\'s '
         'samples scored with evaluate.py\'s metrics under the same judge.']
paired = ''            # the runs are the families sweep's (compared there)
