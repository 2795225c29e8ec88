# The CPU demo and the README's quick start: the `embed` family (Diffusion-LM on DiT blocks) on the compact
# vocabulary, about 6 minutes on two idle cores (results/quickstart/timings.txt).
#   python train.py config/embed_cpu.py
from config.cpu_common import *  # backbone, token budget and system settings shared by all *_cpu configs

out_dir = 'out-embed-cpu'
model_type = 'embed'
embed_dim = 16          # width of the diffused token embedding (Diffusion-LM's choice for small data)
predict = 'x0'          # predicting x0 lets the rounding loss act on the network output directly
self_cond = True
