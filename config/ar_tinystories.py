# The autoregressive baseline at GPU scale on TinyStories (the yardstick the diffusion families are read against).
#   torchrun --standalone --nproc_per_node=8 train.py config/ar_tinystories.py
from config.tinystories_common import *  # backbone, token budget and system settings of the GPU configs

out_dir = 'out-ar-tinystories'
model_type = 'ar'
rotary = False          # the nanoGPT baseline: learned absolute positions
