# Compare 64- and 256-token context (config/sweep_ctx{64,256}.py). Likelihood: each model on windows of its own
# block_size over the same test tokens, so the difference is what the longer context buys. Samples: both at
# 64 tokens (the smallest block_size, and the judge's), so gen-PPL and diversity compare like for like.
#   python evaluate.py config/eval_ctx.py
ckpts = ['out-sweep-ctx64', 'out-sweep-ctx256']
judge = 'out-ar-cpu'
out_dir = 'eval-ctx'
steps = [10, 100, 1000]
num_samples = 32
sample_batch_size = 32
mc_samples = 4
device = 'cpu'
