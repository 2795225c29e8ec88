# The `mask` family (MDLM) at GPU scale on TinyStories.
#   torchrun --standalone --nproc_per_node=8 train.py config/mask_tinystories.py
from config.tinystories_common import *  # backbone, token budget and system settings of the GPU configs

out_dir = 'out-mask-tinystories'
model_type = 'mask'
mask_schedule = 'loglinear'
time_cond = False
