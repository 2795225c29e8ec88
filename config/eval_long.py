# The long CPU runs of every family (config/*_long_cpu.py) on one yardstick: test bits/token beside the unigram
# line, and 16 samples at 64 steps judged by the ar run (one draw of each bound per window: a CPU-sized run).
#   for f in ar mask embed bits analog; do python train.py config/${f}_long_cpu.py; done
#   python train.py config/ar_long_cpu.py --max_iters=4000 --out_dir=out-ar-long-cpu-4000  # ar at mask's budget
#   python evaluate.py config/eval_long.py
ckpts = ['out-ar-long-cpu', 'out-ar-long-cpu-4000', 'out-mask-long-cpu',
         'out-embed-long-cpu', 'out-bits-long-cpu', 'out-analog-long-cpu']
judge = 'out-ar-long-cpu'  # (it also judges its own samples: that row is its entropy rate, not a quality score)
out_dir = 'eval-long'
steps = [64]
num_samples = 16
sample_batch_size = 16
sample_length = 64
max_windows = 0           # the whole test split (~20k tokens)
mc_samples = 1            # one draw of each bound per window (the SE includes the Monte Carlo noise)
device = 'cpu'
