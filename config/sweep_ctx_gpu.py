# GPU-scale variant of config/sweep_ctx.py: 256, 512 and 1024 tokens on DiT-B (config/<family>_tinystories.py),
# 64 x 256 tokens per micro-batch for every length, and the GPU evaluation.
#   python sweep.py config/sweep_ctx_gpu.py
from config.sweep_ctx import *  # the runs, columns, panels and notes
from config.sweep_common_gpu import *  # gpu(), judge, evaluation, budget at GPU scale

runs = [gpu(r) for r in runs]
results_dir = 'results/sweep-ctx-gpu'
