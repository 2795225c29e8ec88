# CPU: the `bits` family (token ids as 16 bits under independent bit flips) at the CPU demo's size and budget.
#   python train.py config/bits_cpu.py
from config.cpu_common import *  # backbone, token budget and system settings shared by all *_cpu configs

out_dir = 'out-bits-cpu'
model_type = 'bits'
T = 1000
noise_schedule = 'cosine'
