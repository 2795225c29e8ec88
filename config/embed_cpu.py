# The CPU demo and the README's quick start: the `embed` family (Diffusion-LM on DiT blocks) on the compact
# vocabulary, about 9 minutes on two idle cores (results/quickstart/timings.txt).
#   python train.py config/embed_cpu.py
from config.cpu_common import *  # backbone, token budget and system settings shared by all *_cpu configs

out_dir = 'out-embed-cpu'
model_type = 'embed'
embed_dim = 16          # width of the diffused token embedding (Diffusion-LM's choice for small data)
predict = 'x0'          # predicting x0 lets the rounding loss act on the network output directly
continuous_time = True  # VDM's continuous time: at the roadmap's budget it gave embed its best bound and by far its
                        # best samples (EXPERIMENTS.md section 3); the sweeps pin the discrete T = 1000 they ran with
self_cond = False       # self-conditioning's gradient-free first pass makes a step dearer: with it, 3,500 steps took
                        # past the ten minutes (results/quickstart/timings.txt); the sweeps keep it on
