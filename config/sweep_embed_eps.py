# Roadmap sweep, eps vs x0: the CPU `embed` demo with the network predicting the noise eps.
#   python train.py config/sweep_embed_eps.py && python train.py config/sweep_embed_x0.py
#   python evaluate.py config/eval_embed_eps_x0.py
from config.embed_cpu import *  # everything else as in the CPU embed demo, so only `predict` differs

out_dir = 'out-sweep-embed-eps'
predict = 'eps'
