# GPU: the evaluation of the GPU-scale sweeps (config/sweep_gpu.py): more step counts, samples and bound draws.
steps = [10, 100, 1000]
num_samples = 256
sample_batch_size = 128
eval_batch_size = 64
mc_samples = 4
max_windows = 0
device = 'auto'
dtype = 'bfloat16'        # sampling under autocast; likelihoods always run in fp32 (model.nll)
