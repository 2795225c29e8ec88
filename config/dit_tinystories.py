# GPU, the main config: the `embed` family (Diffusion-LM) on DiT-B blocks over all of TinyStories; the other families'
# GPU configs are config/<family>_gpu.py, the same backbone and budget.
#   python prepare.py && python train.py config/dit_tinystories.py
#   torchrun --standalone --nproc_per_node=8 train.py config/dit_tinystories.py
from config.gpu_common import *  # backbone, token budget and system settings of the GPU configs

out_dir = 'out-embed-tinystories'
model_type = 'embed'
embed_dim = 64
predict = 'x0'
self_cond = True
