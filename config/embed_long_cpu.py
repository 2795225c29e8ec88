# The long CPU run of the `embed` family (issue: do the families learn language?): the CPU demo's backbone and
# data, embed settings from config/embed_cpu.py, a longer budget, and held-out bits/token (the family's bound,
# exact for ar) at every evaluation, beside the unigram line; draw the curves with python curves.py.
#   python train.py config/embed_long_cpu.py
from config.embed_cpu import *  # backbone, batch, learning rate and the family's own settings

out_dir = 'out-embed-long-cpu'
max_iters = 1500    # 1500 x 8 x 64 = 768k tokens: ~30 minutes alone on 2 cores (a 600-step run: 8.40 bits)
warmup_iters = 100
eval_interval = 250
always_save_checkpoint = True  # the last weights, whatever the val loss does (the curves are in eval_log.jsonl)
