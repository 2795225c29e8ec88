# CPU: the `ar` family trained longer than config/ar_cpu.py (6,000 steps, 3.07M tokens): the judge whose gen-PPL scores
# samples (the quick start's, config/eval_quickstart.py, and the sweeps', config/sweep_common.py, with its own seed).
#   python train.py config/ar_long_cpu.py
from config.ar_cpu import *  # backbone, batch, learning rate and the family's own settings

out_dir = 'out-ar-long-cpu'
max_iters = 6000        # 6000 x 8 x 64 = 3.07M tokens, 3.3 epochs of the compact sample's train split
warmup_iters = 100
eval_interval = 250
always_save_checkpoint = True  # the last weights, whatever the val loss does (a judge is its last weights)
