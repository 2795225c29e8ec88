# The autoregressive baseline (causal attention, next-token loss) at the CPU demo's size and budget.
#   python train.py config/ar_cpu.py
from config.cpu_common import *  # backbone, token budget and system settings shared by all *_cpu configs

out_dir = 'out-ar-cpu'
model_type = 'ar'
