# CPU, roadmap: the speed-quality frontier. Sample quality (gen-PPL under the judge, unigram entropy) against sampling
# cost (network evaluations and seconds per sample) for every family, at its default sampler and at its best honest
# settings, over step counts; ar is a point per temperature. Held-out text is the dashed line.
# The runs are the families sweep's first seed (trained once, shared), so this sweep only samples.
#   python sweep.py config/sweep_frontier.py
from config.sweep_common import *  # judge, evaluation, budget
from config.sweep_common import _ITERS, _SEEDS, _run

runs = [_run(f, out_dir=f'out-sweep-{f}', max_iters=_ITERS, seed=_SEEDS[0])
        for f in ('embed', 'bits', 'analog', 'mask', 'ar')]
results_dir = 'results/sweep-frontier'
# each family samples with the settings its sampler takes: {} is every family's default (embed: DDIM at eta = 1, which
# is DDPM's ancestral step, with clamping; analog: DDIM at eta = 0, no clamping; bits, mask, ar: temperature 1); the
# others are the settings that brought each family closest to held-out text with its entropy within ~10%
# (EXPERIMENTS.md section 2)
eval_overrides = {'steps': [10, 25, 100, 250],
                  'sample_settings': [{}, {'eta': 0.0, 'clamp': False}, {'eta': 1.0, 'clamp': True},
                                      {'temperature': 0.8}, {'temperature': 0.3}],
                  'mc_samples': 1, 'max_windows': 64}  # the likelihood is the families sweep's; here a check only
paired = ''
panels = ['gen_ppl_nfe', 'gen_ppl_seconds', 'entropy_nfe']
notes = ['A setting a family\'s sampler already uses by default (embed: eta=1.0, clamp=True; analog: eta=0.0, '
         'clamp=False) repeats its default rows.',
         'Seconds per sample: the sampler\'s wall-clock for a batch, divided by the samples, on the machine that '
         'scored.',
         'The GPT-2 judge (a Hugging Face model) is not available offline here; gen-PPL is the sweep\'s ar judge\'s.']
