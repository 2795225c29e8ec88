# Compare the eps and x0 parameterisations of `embed` (config/sweep_embed_{eps,x0}.py) on likelihood and samples.
#   python evaluate.py config/eval_embed_eps_x0.py
ckpts = ['out-sweep-embed-eps', 'out-sweep-embed-x0']
judge = 'out-ar-cpu'      # the CPU ar baseline: python train.py config/ar_cpu.py
out_dir = 'eval-embed-eps-x0'
steps = [10, 100, 1000]
num_samples = 32
sample_batch_size = 32
mc_samples = 4
device = 'cpu'
