# Compare the eps and x0 parameterisations of `embed` (config/sweep_embed_{eps,x0}.py) on likelihood and samples.
#   python evaluate.py config/eval_embed_eps_x0.py
from config.eval_sweep_common import *  # judge, steps, sample budget, bound draws

ckpts = ['out-sweep-embed-eps', 'out-sweep-embed-x0']
out_dir = 'eval-embed-eps-x0'
