# GPU: the `mask` family (MDLM) at DiT-B scale on all of TinyStories.
#   torchrun --standalone --nproc_per_node=8 train.py config/mask_gpu.py
from config.gpu_common import *  # backbone, token budget and system settings of the GPU configs

out_dir = 'out-mask-tinystories'
model_type = 'mask'
mask_schedule = 'loglinear'
time_cond = False
