# GPU: the autoregressive baseline at DiT-B scale on all of TinyStories (the yardstick the diffusion families are read
# against).
#   torchrun --standalone --nproc_per_node=8 train.py config/ar_gpu.py
from config.gpu_common import *  # backbone, token budget and system settings of the GPU configs

out_dir = 'out-ar-tinystories'
model_type = 'ar'
rotary = False          # the nanoGPT baseline: learned absolute positions
