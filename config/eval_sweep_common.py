# The evaluation of the CPU sweeps (sweep.py passes the checkpoints, the judge and the output directory): the
# same step counts, sample budget and bound draws for every sweep, so they compare on one yardstick.
#   python sweep.py config/sweep_families.py   (and the other config/sweep_*.py)
steps = [10, 100]
num_samples = 32
sample_batch_size = 32
mc_samples = 4            # four draws of each bound per window: a smaller standard error for the diffusion rows
max_windows = 0           # the whole test split (~20k tokens of the TinyStories sample)
device = 'cpu'
