# CPU: the `mask` family (MDLM: absorbing [MASK] diffusion) at the CPU demo's size and budget.
#   python train.py config/mask_cpu.py
from config.cpu_common import *  # backbone, token budget and system settings shared by all *_cpu configs

out_dir = 'out-mask-cpu'
model_type = 'mask'
mask_schedule = 'loglinear'
time_cond = False       # MDLM: the fraction of [MASK] tokens already tells the network the time
