# CPU, roadmap: the number of diffusion steps T (100, 250, 1000, 4000) for embed and bits: the bound and the samples
# against T, and both in continuous time (T -> infinity, continuous_time=True: VDM's integral bound for embed, the
# path KL of two jump processes for bits; T = 1000 then only places the decoder at 1/1000 of the way and sets the
# default steps). Every run samples at the same step counts (at most the smallest T), so the rows differ in T only.
# mask, continuous-time by construction, is in config/sweep_families.py.
#   python sweep.py config/sweep_t_values.py
from config.sweep_common import *  # judge, evaluation, budget
from config.sweep_common import _ITERS, _run

runs = [_run(f, out_dir=f'out-sweep-{f}' + ('' if T == 1000 else f'-T{T}'), max_iters=_ITERS, T=T)
        for f in ('embed', 'bits') for T in (100, 250, 1000, 4000)]
runs.insert(4, _run('embed', out_dir='out-sweep-embed-Tcont', max_iters=_ITERS, T=1000, continuous_time=True))
runs.append(_run('bits', out_dir='out-sweep-bits-Tcont', max_iters=_ITERS, T=1000, continuous_time=True))
results_dir = 'results/sweep-t-values'
columns = ['T', 'continuous_time']
x = 'T'
panels = ['bits_x', 'gen_ppl_x', 'bits_tokens']
# samples at 25 steps only (at most the smallest T, so every run samples alike); the likelihood on the whole test
# split with the evaluation's per-family draws, so the T values of a family compare window by window
eval_overrides = {'steps': [25]}
notes = ['continuous_time=True is drawn as its own point at T = 1000, the decoder time it shares with the discrete '
         'T = 1000 run of its family.']
paired = 'within'      # the T values of a family against each other, window by window
