# CPU: the evaluation of the sweeps (sweep.py passes the checkpoints, the judge and the output directory): the
# same step counts, sample budget and bound draws for every sweep, so they compare on one yardstick.
#   python sweep.py config/sweep_families.py   (and the other config/sweep_*.py)
steps = [10, 100]
num_samples = 32
sample_batch_size = 32
mc_samples = 4            # draws of each bound per window, for a family not named below
# per family, draws in proportion to one draw's variance: on the families sweep's checkpoints (two draws on each of
# the first 96 test windows) it is 4.7 (embed), 7.2 (analog) and 11.2 (bits) squared bits/token per window. The
# windows' own spread sets a floor no number of draws lowers; evaluate.py reports each run's draw variance and the
# draws' part of its SE (draw_var, se_draws, from these draws), and sweep.py what more draws would buy a verdict
mc_samples_by_family = {'embed': 8, 'analog': 12, 'bits': 16, 'mask': 4}
max_windows = 0           # the whole test split (~20k tokens of the TinyStories sample)
device = 'cpu'
