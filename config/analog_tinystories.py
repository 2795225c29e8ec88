# The `analog` family (Analog Bits) at GPU scale on TinyStories.
#   torchrun --standalone --nproc_per_node=8 train.py config/analog_tinystories.py
from config.tinystories_common import *  # backbone, token budget and system settings of the GPU configs

out_dir = 'out-analog-tinystories'
model_type = 'analog'
analog_scale = 1.0
self_cond = True
