# GPU-scale variant of config/sweep_eps_x0.py (DiT-B, config/embed_tinystories.py), with the GPU evaluation.
#   python sweep.py config/sweep_eps_x0_gpu.py
from config.sweep_eps_x0 import *  # the runs, columns, panels and notes
from config.sweep_common_gpu import *  # gpu(), judge, evaluation, budget at GPU scale

runs = [gpu(r) for r in runs]
results_dir = 'results/sweep-eps-x0-gpu'
