# GPU: any CPU sweep at DiT-B scale. Given after the sweep's own config, it maps its runs and judge to the GPU configs
# (config/<family>_gpu.py, embed's config/dit_tinystories.py: 12 x 768, 256-token windows, 131k tokens a step; context
# lengths scale by 4, the batch keeping the tokens a step), 10,000 iterations each, one run at a time, out_dirs and a
# results_dir of their own, and the GPU evaluation (eval_overrides below: more step counts, samples and bound draws); a
# sweep keeps its sampler settings and position buckets. (Not for sweep_epochs.py, whose budgets are epochs of the
# CPU sample.)
#   python sweep.py config/sweep_families.py config/sweep_gpu.py
#   python sweep.py config/sweep_t_values.py config/sweep_gpu.py --launcher="torchrun --standalone --nproc_per_node=8"
import os

_ITERS_GPU = 10000      # 10k x 131k = 1.3B tokens per run (config/gpu_common.py's batch)


def _gpu(run):
    family = os.path.basename(run.get('config', train_config)).split('_')[0]  # <family>_cpu.py, ar_long_cpu.py
    run = dict(run, config='config/dit_tinystories.py' if family == 'embed' else f'config/{family}_gpu.py',
               out_dir=run['out_dir'] + '-gpu', max_iters=_ITERS_GPU)
    if 'block_size' in run:
        run['block_size'] *= 4
        run['batch_size'] = 64 * 256 // run['block_size']
    return run


runs = [_gpu(r) for r in runs]
judge = _gpu(judge) if judge else judge
results_dir = results_dir + '-gpu'
eval_config = 'config/eval_sweep_common.py'
eval_overrides = {**{k: v for k, v in eval_overrides.items() if k in ('sample_settings', 'position_buckets')},
                  'steps': [10, 100, 1000], 'num_samples': 256, 'sample_batch_size': 128, 'eval_batch_size': 64,
                  'mc_samples': 4, 'mc_samples_by_family': {}, 'max_windows': 0, 'device': 'auto',
                  'dtype': 'bfloat16'}  # sampling under autocast; likelihoods always run in fp32 (model.nll)
jobs = 1                # one run at a time: each takes the whole GPU (or all of them, with a torchrun launcher)
