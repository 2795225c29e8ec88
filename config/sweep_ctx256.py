# Roadmap sweep, context length: the CPU `embed` demo on 256-token windows. The batch shrinks to keep the
# token budget of sweep_ctx64.py (8 x 256 = 2,048 tokens per step, the same number of steps), so the two runs
# see the same number of tokens and differ only in how much context each prediction has.
#   python train.py config/sweep_ctx256.py
from config.embed_cpu import *  # everything else as in the CPU embed demo

out_dir = 'out-sweep-ctx256'
block_size = 256
batch_size = 8
