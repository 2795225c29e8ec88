# Roadmap sweep, context length: the CPU `embed` demo on 64-token windows (32 x 64 = 2,048 tokens per step).
#   python train.py config/sweep_ctx64.py && python train.py config/sweep_ctx256.py
#   python evaluate.py config/eval_ctx.py
# Another family: add e.g. --model_type=mask --out_dir=out-sweep-mask-ctx64 to both runs.
from config.embed_cpu import *  # everything else as in the CPU embed demo

out_dir = 'out-sweep-ctx64'
block_size = 64
batch_size = 32
