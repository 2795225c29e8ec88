# CPU: the demo and the README's quick start: the `embed` family (Diffusion-LM on DiT blocks) on the compact
# vocabulary: under ten minutes on two idle cores with its sampling (results/quickstart/timings.txt).
#   python train.py config/embed_cpu.py
from config.cpu_common import *  # backbone, token budget and system settings shared by all *_cpu configs

out_dir = 'out-embed-cpu'
model_type = 'embed'
embed_dim = 16          # width of the diffused token embedding (Diffusion-LM's choice for small data)
predict = 'x0'          # predicting x0 lets the rounding loss act on the network output directly
continuous_time = True  # VDM's continuous time: in the roadmap's one-seed runs (EXPERIMENTS.md section 3) its samples
                        # were embed's best (gen-PPL 157.6 against 279.7 at T = 1000, 25 steps) and its bound the
                        # lowest, not resolved against T = 1000's (0.126 +- 0.074); the sweeps pin their T = 1000
self_cond = True        # self-conditioning: the sampler feeds each step's x0 estimate back (as in every sweep's embed
                        # run); its extra half forward pass makes a step dearer, paid for in steps (max_iters)
max_iters = 2600        # 2,600 x 8 x 64 = 1.33M tokens: what ten minutes hold with self-conditioning's extra pass
eval_interval = 1000    # an evaluation costs a few seconds of the ten minutes: at steps 0, 1,000, 2,000 and the last
