# GPU-scale variant of config/sweep_families.py: the DiT-B backbone of config/tinystories_common.py (12 x 768,
# 256-token windows, 131k tokens per step) for every family, and the GPU evaluation.
#   python sweep.py config/sweep_families_gpu.py
#   python sweep.py config/sweep_families_gpu.py --launcher="torchrun --standalone --nproc_per_node=8"
from config.sweep_families import *  # the runs, panels and notes
from config.sweep_common_gpu import *  # gpu(), judge, evaluation, budget at GPU scale

runs = [gpu(r) for r in runs]
results_dir = 'results/sweep-families-gpu'
