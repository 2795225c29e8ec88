# Shared by the GPU-scale sweeps (config/sweep_*_gpu.py): each takes its CPU sweep's runs and maps them with
# gpu(): the family's GPU config (config/<family>_tinystories.py: DiT-B, 256-token windows, 131k tokens per step)
# instead of its CPU one, a GPU budget, and out_dirs of their own.
_ITERS_GPU = 10000      # 10k x 131k = 1.3B tokens per run (config/tinystories_common.py's batch)


def gpu(run):
    """A CPU sweep's run at GPU scale (context lengths scale by 4: 64 -> 256, ...; batch keeps the tokens/step)."""
    run = dict(run, config=run['config'].replace('_cpu.py', '_tinystories.py'),
               out_dir=run['out_dir'] + '-gpu', max_iters=_ITERS_GPU)
    if 'block_size' in run:
        run['block_size'] *= 4
        run['batch_size'] = 64 * 256 // run['block_size']
    return run


judge = gpu(dict(config='config/ar_cpu.py', out_dir='out-sweep-judge', seed=2))
eval_config = 'config/eval_sweep_gpu.py'
jobs = 1                # one run at a time: each takes the whole GPU (or all of them, with a torchrun launcher)
