# The long CPU run of the `mask` family (issue: do the families learn language?): the CPU demo's backbone and
# data, mask settings from config/mask_cpu.py, a longer budget, and held-out bits/token (the family's bound,
# exact for ar) at every evaluation, beside the unigram line; draw the curves with python curves.py.
#   python train.py config/mask_long_cpu.py
from config.mask_cpu import *  # backbone, batch, learning rate and the family's own settings

out_dir = 'out-mask-long-cpu'
max_iters = 4000    # 4000 x 8 x 64 = 2.05M tokens (~2.2 epochs of the train split): mask passes 1 bit below the
                    # unigram line at ~900k tokens; about an hour on one core (a 1,000-step run: 8.19 bits)
warmup_iters = 100
eval_interval = 250
always_save_checkpoint = True  # the last weights, whatever the val loss does (the curves are in eval_log.jsonl)
