# CPU, roadmap: eps vs x0 prediction for the two Gaussian families, embed and analog: the bound, the samples and the
# training curves. The x0 rows are the families' defaults (shared with config/sweep_families.py).
#   python sweep.py config/sweep_eps_x0.py
from config.sweep_common import *  # judge, evaluation, budget
from config.sweep_common import _ITERS, _run

runs = [_run(f, out_dir=f'out-sweep-{f}' + ('' if p == 'x0' else '-eps'), max_iters=_ITERS, predict=p)
        for f in ('embed', 'analog') for p in ('x0', 'eps')]
results_dir = 'results/sweep-eps-x0'
columns = ['predict']
panels = ['bits_tokens', 'gen_ppl_steps', 'entropy_steps']
paired = 'within'      # x0 against eps within each family, window by window
