# GPU: the `analog` family (Analog Bits) at DiT-B scale on all of TinyStories.
#   torchrun --standalone --nproc_per_node=8 train.py config/analog_gpu.py
from config.gpu_common import *  # backbone, token budget and system settings of the GPU configs

out_dir = 'out-analog-tinystories'
model_type = 'analog'
analog_scale = 1.0
self_cond = True
