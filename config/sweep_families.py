# CPU, roadmap: embed (Gaussian diffusion on token embeddings) vs bit diffusion, with the other families as context,
# at equal tokens seen (the same backbone, batch and iterations for every family) and at equal wall-clock (the curves
# against training seconds).
# Table: test bits/token ± SE, context gain, gen-PPL and entropy against sampling steps, training s/iter, tok/s.
#   python sweep.py config/sweep_families.py
from config.sweep_common import *  # judge, evaluation, budget
from config.sweep_common import _ITERS, _SEEDS, _run

# every family twice, with two seeds (weights, data order and noise): the seed spread is part of the error
runs = [_run(f, out_dir=f'out-sweep-{f}' + ('' if s == _SEEDS[0] else f'-seed{s}'), max_iters=_ITERS, seed=s)
        for f in ('embed', 'bits', 'analog', 'mask', 'ar') for s in _SEEDS]
columns = ['seed']
results_dir = 'results/sweep-families'
panels = ['bits_tokens', 'bits_seconds', 'gen_ppl_steps', 'entropy_steps']
notes = ['Equal wall-clock: read the bits_seconds panel (val bits/token from each eval_log.jsonl against training '
         'seconds; train.py logs each with its standard error over 80 windows, val_bits_se: 0.1 to 0.5 bits/token '
         'here). Training s/iter in the table is the time per iteration measured by train.py; sampling speed is the '
         'tok/s column.']
