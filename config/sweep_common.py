# CPU: shared by the sweeps (config/sweep_*.py, run by sweep.py): one judge, one evaluation and one training
# budget, so every sweep reads its runs on the same yardstick, and runs with the same settings in two sweeps
# share one out_dir (trained once: e.g. out-sweep-embed is the embed row of sweep_families.py, the T = 1000 row
# of sweep_t_values.py and the x0 row of sweep_eps_x0.py).
from config.cpu_common import eval_interval as _EVAL_INTERVAL  # every CPU run's (embed_cpu.py's differs)
_ITERS = 4000           # every CPU run: 4000 x 8 x 64 = 2.05M tokens (config/cpu_common.py's backbone and batch), a
                        # budget at which every diffusion family has learned context (EXPERIMENTS.md section 1)
_SEEDS = (1337, 1338)   # the families sweep trains every run with both: the seed spread beside the MC error


def _run(family, **settings):
    """A sweep run of `family`: its config/<family>_cpu.py with `settings` on top. The roadmap's embed runs are
    self-conditioned, take T = 1000 discrete steps and evaluate as often as every CPU run, where the quick start's
    config/embed_cpu.py may differ (it trains in continuous time and evaluates less often): they are set here unless
    the run sets them itself."""
    pinned = dict(self_cond=True, continuous_time=False, eval_interval=_EVAL_INTERVAL) if family == 'embed' else {}
    return dict(config=f'config/{family}_cpu.py', **{**pinned, **settings})


# the judge: an ar run of its own, longer than the compared runs and with another seed (the compared ar run is not
# scored by its near twin)
judge = dict(config='config/ar_long_cpu.py', out_dir='out-sweep-judge', seed=2)
eval_config = 'config/eval_sweep_common.py'
jobs = 2                # two runs at once, one core each (sweep.py sets OMP_NUM_THREADS): the 2-core CPU's best use
