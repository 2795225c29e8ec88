# GPU: the `bits` family (bit-flip diffusion over the 16 bits of each id) at DiT-B scale on all of TinyStories.
#   torchrun --standalone --nproc_per_node=8 train.py config/bits_gpu.py
from config.gpu_common import *  # backbone, token budget and system settings of the GPU configs

out_dir = 'out-bits-tinystories'
model_type = 'bits'
noise_schedule = 'cosine'   # bit flips: cosine keeps most steps at a low flip rate (sqrt flips half the bits early)
