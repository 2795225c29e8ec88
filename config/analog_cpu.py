# CPU: the `analog` family (Analog Bits: the id's bits as +-1 reals under Gaussian noise) at the demo's size and
# budget.
#   python train.py config/analog_cpu.py
from config.cpu_common import *  # backbone, token budget and system settings shared by all *_cpu configs

out_dir = 'out-analog-cpu'
model_type = 'analog'
analog_scale = 1.0
self_cond = True
