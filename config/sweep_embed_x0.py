# Roadmap sweep, eps vs x0: the CPU `embed` demo with the network predicting the clean embeddings x0
# (the demo's own setting, in its own out_dir so the pair is trained and compared side by side).
#   python train.py config/sweep_embed_x0.py
from config.embed_cpu import *  # everything else as in the CPU embed demo, so only `predict` differs

out_dir = 'out-sweep-embed-x0'
predict = 'x0'
