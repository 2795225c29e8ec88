# The `embed` family (Diffusion-LM on DiT-B blocks) at GPU scale on TinyStories.
#   torchrun --standalone --nproc_per_node=8 train.py config/embed_tinystories.py
from config.tinystories_common import *  # backbone, token budget and system settings of the GPU configs

out_dir = 'out-embed-tinystories'
model_type = 'embed'
embed_dim = 64
predict = 'x0'
self_cond = True
