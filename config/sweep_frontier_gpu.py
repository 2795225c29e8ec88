# GPU-scale variant of config/sweep_frontier.py (DiT-B, config/<family>_tinystories.py), with the GPU evaluation.
#   python sweep.py config/sweep_frontier_gpu.py
from config.sweep_frontier import *  # the runs, sampler settings, panels and notes
from config.sweep_common_gpu import *  # gpu(), judge, evaluation, budget at GPU scale

runs = [gpu(r) for r in runs]
results_dir = 'results/sweep-frontier-gpu'
eval_overrides = {k: v for k, v in eval_overrides.items() if k not in ('mc_samples', 'max_windows')}
