# The long CPU run of the `ar` family (issue: do the families learn language?): the CPU demo's backbone and
# data, ar settings from config/ar_cpu.py, a longer budget, and held-out bits/token (the family's bound,
# exact for ar) at every evaluation, beside the unigram line; draw the curves with python curves.py.
#   python train.py config/ar_long_cpu.py
from config.ar_cpu import *  # backbone, batch, learning rate and the family's own settings

out_dir = 'out-ar-long-cpu'
max_iters = 6000        # 6000 x 8 x 64 = 3.07M tokens, 3.3 epochs of the compact sample's train split: at 60-200 ms
                        # a step (bench.py, 2 cores) every family's long run takes 6-20 minutes alone
warmup_iters = 100
eval_interval = 250
always_save_checkpoint = True  # the last weights, whatever the val loss does (the curves are in eval_log.jsonl)
