# GPU-scale variant of config/sweep_t_values.py (DiT-B, config/<family>_tinystories.py), with the GPU evaluation.
#   python sweep.py config/sweep_t_values_gpu.py
from config.sweep_t_values import *  # the runs, columns, panels and notes
from config.sweep_common_gpu import *  # gpu(), judge, evaluation, budget at GPU scale

runs = [gpu(r) for r in runs]
results_dir = 'results/sweep-t-values-gpu'
eval_overrides = {}  # the GPU evaluation's step counts and draws (the CPU sweep samples at 25 steps only)
