# The roadmap's step sweep: every family of the CPU demo, sampled at 10 .. 1000 steps, judged by the ar baseline.
#   python evaluate.py config/eval_steps.py
# Train the checkpoints first: python train.py config/{ar,embed,bits,analog,mask}_cpu.py
# (the judge is also one of the compared models: its own row measures its entropy rate, not sample quality)
ckpts = ['out-ar-cpu', 'out-embed-cpu', 'out-bits-cpu', 'out-analog-cpu', 'out-mask-cpu']
judge = 'out-ar-cpu'
out_dir = 'eval-steps'
steps = [10, 30, 100, 300, 1000]  # the Gaussian and bit families take at most T = 1000
num_samples = 32
sample_batch_size = 32
sample_length = 64        # the CPU configs' block_size
max_windows = 0           # the whole test split (~20k tokens of the TinyStories sample)
mc_samples = 4            # four draws of each bound per window: a smaller standard error for the diffusion rows
device = 'cpu'
