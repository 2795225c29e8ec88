# Shared by the sweep evaluations (config/eval_ctx.py, config/eval_embed_eps_x0.py): the same judge, step
# counts, sample budget and bound draws, so the sweeps compare on one yardstick.
judge = 'out-ar-cpu'      # the CPU ar baseline: python train.py config/ar_cpu.py
steps = [10, 100, 1000]
num_samples = 32
sample_batch_size = 32
mc_samples = 4
device = 'cpu'
