# Roadmap: eps vs x0 prediction for embed: the bound, the samples and the training curves. analog is not in it:
# model.py allows predict='eps' for embed only (analog always predicts x0 through its vocabulary logits).
#   python sweep.py config/sweep_eps_x0.py
from config.sweep_common import *  # judge, evaluation, budget
from config.sweep_common import _ITERS

runs = [dict(config='config/embed_cpu.py', out_dir='out-sweep-embed' + ('' if p == 'x0' else '-eps'),
             max_iters=_ITERS, predict=p)
        for p in ('x0', 'eps')]
results_dir = 'sweep-eps-x0'
columns = ['predict']
panels = ['bits_tokens', 'gen_ppl_steps', 'entropy_steps']
notes = ["analog is not compared: model.py's ModelConfig allows predict='eps' for model_type='embed' only."]
