# Compare 64- and 256-token context (config/sweep_ctx{64,256}.py). Likelihood: each model on windows of its own
# block_size over the same test tokens, so the difference is what the longer context buys. Samples: both at
# 64 tokens (the smallest block_size, and the judge's), so gen-PPL and diversity compare like for like.
#   python evaluate.py config/eval_ctx.py
from config.eval_sweep_common import *  # judge, steps, sample budget, bound draws

ckpts = ['out-sweep-ctx64', 'out-sweep-ctx256']
out_dir = 'eval-ctx'
