# CPU, data reuse: every family trained for many epochs of the TinyStories sample (942,841 train tokens), to see
# whether a diffusion family keeps improving after ar has begun to overfit, and where (or whether) it overtakes ar.
#   python sweep.py config/sweep_epochs.py          (resumes where it stopped: run it again after an interruption)
#   python sweep.py config/sweep_epochs.py --train=False   (scores the budgets finished so far, training nothing)
# One learning-rate schedule for every run, warmup-stable-decay (train.py's lr_schedule='wsd'): each family trains one
# constant-rate stem, and the model at a budget of E epochs is a branch of it, taken at 0.8 E and cooled down linearly
# to min_lr over the last 0.2 E. Every budget's model is then fully annealed, as a run of exactly that length would be
# (Hagele et al. 2024 find a 20% cooldown matches a cosine schedule of the same length), while the stem is trained
# once: a ladder of budgets up to E costs ~1.2 E epochs, where separate cosine runs would cost the ladder's sum.
from config.sweep_common import *  # judge, evaluation, the CPU backbone
from config.sweep_common import _run

epoch_tokens = 942841      # the compact sample's train split: the runs are budgets of epochs (the convergence tables)
_EPOCH = epoch_tokens / (8 * 64)  # iterations per epoch: train tokens / tokens per iteration (1841.5)
_COOLDOWN = 0.2             # each budget's last fifth is its cooldown
_LADDER = (0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)  # budgets, epochs: log-spaced, the same for every family
_AR_EXTRA = (12, 24)        # ar: denser where it turns (~13 epochs in a cosine pilot)
_MAX_EPOCHS = {'ar': 32, 'mask': 64, 'embed': 32, 'bits': 32, 'analog': 32}  # ar past its best; mask to 128 if it is
                            # still falling at 64 (a larger top only adds stages: the stem extends); the others the
                            # issue's 32
_SECOND_SEED = 32           # ar and mask: a second seed up to this budget (the seed spread beside the MC error)


def _ladder(family, seed, top):
    """The branches of one stem: family at seed, one run per budget of _LADDER up to `top` epochs."""
    tag = f'out-epochs-{family}' + ('' if seed == 1337 else f'-seed{seed}')
    out = []
    for e in sorted(b for b in _LADDER + (_AR_EXTRA if family == 'ar' else ()) if b <= top):
        iters = round(e * _EPOCH)
        out.append(_run(family, out_dir=f'{tag}-e{e:g}', branch_from=f'{tag}-stem', seed=seed, max_iters=iters,
                        lr_schedule='wsd', cooldown_iters=round(_COOLDOWN * iters), eval_interval=921))
    return out


# order is priority: ar and mask first (the question's two ends), embed (the best family at 2 epochs), the second
# seeds of ar and mask, then bits and analog
runs = [*_ladder('ar', 1337, _MAX_EPOCHS['ar']), *_ladder('mask', 1337, _MAX_EPOCHS['mask']),
        *_ladder('embed', 1337, _MAX_EPOCHS['embed']),
        *_ladder('ar', 1338, _SECOND_SEED), *_ladder('mask', 1338, _SECOND_SEED),
        *(r for f in ('bits', 'analog') for r in _ladder(f, 1337, _MAX_EPOCHS[f]))]
splits = ['val', 'test']  # a family's best budget is chosen on val and reported on test
columns = ['seed', 'max_iters']
x = 'max_iters'
results_dir = 'results/sweep-epochs'
panels = ['budgets_epochs', 'budgets_seconds', 'losses_epochs', 'gen_ppl_x']
paired = ''              # the convergence tables pair each family with ar at a budget
notes = ['Each run is a budget: max_iters / 1841.5 epochs of the train split; its model is a branch of its family\'s '
         'constant-rate stem, cooled down over its last 20% (warmup-stable-decay).']
