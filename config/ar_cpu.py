# CPU: the autoregressive baseline (causal attention, next-token loss) at the CPU demo's size and budget.
#   python train.py config/ar_cpu.py
from config.cpu_common import *  # backbone, token budget and system settings shared by all *_cpu configs

out_dir = 'out-ar-cpu'
model_type = 'ar'
rotary = False          # the nanoGPT baseline: learned absolute positions (a causal model reads its neighbour
                        # directly: the current token predicts the next without any attention)
