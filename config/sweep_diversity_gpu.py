# GPU-scale variant of config/sweep_diversity.py (DiT-B, config/<family>_tinystories.py), with the GPU evaluation.
#   python sweep.py config/sweep_diversity_gpu.py
from config.sweep_diversity import *  # the runs, temperatures, panels and notes
from config.sweep_common_gpu import *  # gpu(), judge, evaluation, budget at GPU scale

runs = [gpu(r) for r in runs]
results_dir = 'results/sweep-diversity-gpu'
