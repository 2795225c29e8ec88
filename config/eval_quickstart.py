# CPU: the quick start's model against its baselines, and its sampler against the number of steps: the README's
# quick-start figures and the choice of embed's default sampler (steps, clamp, eta) come from this run.
#   python prepare.py --input=corpus/tinystories --vocab=compact
#   python train.py config/embed_cpu.py            # the quick start's model
#   python train.py config/ar_long_cpu.py          # the judge: ar on the same data, 3.07M tokens
#   python evaluate.py config/eval_quickstart.py
ckpts = ['out-embed-cpu']
judge = 'out-ar-long-cpu'
out_dir = 'results/quickstart'
steps = [25, 50, 100, 200, 400]
sample_settings = [{'eta': 0.0, 'clamp': False}, {'eta': 1.0, 'clamp': True}]  # plain DDIM; eta 1 + clamping
num_samples = 32
sample_batch_size = 32
sample_length = 64        # the CPU configs' block_size
max_windows = 0           # the whole test split (~20k tokens of the TinyStories sample)
mc_samples = 4            # four draws of the bound per window: a smaller standard error
device = 'cpu'
