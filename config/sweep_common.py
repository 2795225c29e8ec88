# Shared by the CPU sweeps (config/sweep_*.py, run by sweep.py): one judge, one evaluation and one training
# budget, so every sweep reads its runs on the same yardstick, and runs with the same settings in two sweeps
# share one out_dir (trained once: e.g. out-sweep-embed is the embed row of sweep_families.py, the T = 1000 row
# of sweep_t_values.py and the x0 row of sweep_eps_x0.py).
_ITERS = 200            # every CPU run: 200 x 8 x 64 = 102k tokens (config/cpu_common.py's backbone and batch)

# the judge: an ar run of its own (another seed than the compared ar run, so that one is not scored by itself)
judge = dict(config='config/ar_cpu.py', out_dir='out-sweep-judge', max_iters=2 * _ITERS, seed=2)
eval_config = 'config/eval_sweep_common.py'
