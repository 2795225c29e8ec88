"""
Context probe: how much a trained model's prediction of a token draws on the rest of its window.

    python probe.py --ckpt=out-mask-long-cpu
    python probe.py --ckpt=out-bits-long-cpu --windows=160

At one random position l of each held-out window (the first `windows` of the split, as evaluate.py cuts them):
  mask              -log p(x_l | z) with x_l masked and a fraction f of the other positions masked too (a uniform
                    subset per window), for each f in `fractions`; the rise from f = 0 to f = 1 is what the context
                    is worth to the model. A time-conditioned model is told the time whose mask rate is f.
  embed/bits/analog every position noised to step t of the forward process, for each t in `steps`: -log p(x_l | z_t)
                    with the window's own noisy context, and with the context of another window (the next one,
                    noised to the same t) around the same noisy z_t[l]; the difference is what the prediction at t
                    takes from context (0 for a model that learned token frequencies and nothing else).
ar is not probed: its exact NLL by position is evaluate.py's `by_position`.
Reported in nats, each beside the unigram cross-entropy of the same tokens (a unigram model of the train split), with
standard errors over windows. Writes a markdown table to stdout and, with out_file set, JSON: checked before any work,
it replaces only probe.py's own JSON unless overwrite=True (util.check_output). The split probed is checked for token
ids beyond the vocabulary first.
"""

import functools

import torch

import util
from checkpoint import load_checkpoint
from configurator import configure
from diffusion import ids_to_bits
from evaluate import checkpoint_data_dir, fmt, mean_se
from prepare import TokenWindows, check_ids, unigram_logprobs

# -----------------------------------------------------------------------------------------------------
ckpt = 'out-mask-cpu'       # the checkpoint: an out_dir or a .pt file
data_dir = ''               # '' -> the checkpoint's own data_dir (from its training config)
split = 'val'               # the windows probed
windows = 160               # how many (the first ones), one probed position each
fractions = [0.0, 0.25, 0.5, 0.75, 1.0]  # mask: fractions of the other positions masked
steps = [100, 200, 300, 400, 500, 600, 700, 800, 900]  # embed/bits/analog: steps t of the forward process
batch_size = 32             # windows per forward pass
seed = 0                    # the positions, subsets and noise
out_file = ''               # also write the results here as JSON
overwrite = False          # let out_file replace a file that is not probe.py's own JSON
_config_keys = ['ckpt', 'data_dir', 'split', 'windows', 'fractions', 'steps', 'batch_size', 'seed', 'out_file', 'overwrite']
# -----------------------------------------------------------------------------------------------------

fail = functools.partial(util.fail, 'probe.py')


def target_nll(logp, x, pos):
    """-log p(x[b, pos[b]]) at each window's probed position: (B,) float64."""
    rows = torch.arange(len(x))
    return -logp[rows, pos].double().gather(-1, x[rows, pos].unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def probe_mask(model, x, pos, fractions, gen):
    """{f: (B,) nats}: -log p(x_l | x with l and a fraction f of the other positions masked)."""
    B, L = x.shape
    rows = torch.arange(B)
    out = {}
    for f in fractions:
        keys = torch.rand((B, L), generator=gen)
        keys[rows, pos] = 2.0  # l ranks last, so the subset is drawn from the other L - 1 positions
        masked = keys.argsort(1).argsort(1) < round(f * (L - 1))
        masked[rows, pos] = True
        z = torch.where(masked, model.mask_id, x)
        t = model.schedule.time_of_mask_rate(torch.full((B,), f)) if model.config.time_cond else None
        out[f] = target_nll(model.log_probs(z, t), x, pos)
    return out


def noisy_log_probs(model, x, t, gen):
    """(z_t of every position, a function z -> log p(x_0 | z) over the vocabulary at step t) for a noisy-state
    family: its logits (the network's plus the likelihood of z under each token), normalised."""
    tt = torch.full((len(x),), t, dtype=model.process.time_dtype)
    if model.config.model_type == 'bits':
        z = model.process.q_sample(ids_to_bits(x, model.num_bits).float(), tt, gen)
        return z, lambda z: model.id_logits(z, tt).double().log_softmax(-1)
    x0 = model.clean(x)
    z = model.process.q_sample(x0, tt, torch.randn(x0.shape, generator=gen).to(x0.dtype))
    return z, lambda z: model.denoise(z, tt)[1].double().log_softmax(-1)


@torch.no_grad()
def probe_noisy(model, x, pos, steps, gen):
    """{t: ((B,) nats with the window's own noisy context, (B,) nats with the next window's)} at step t."""
    rows = torch.arange(len(x))
    out = {}
    for t in steps:
        z, log_probs = noisy_log_probs(model, x, t, gen)
        swapped = z.roll(1, 0).clone()  # every window's context from the one before it, noised to the same t
        swapped[rows, pos] = z[rows, pos]
        out[t] = (target_nll(log_probs(z), x, pos), target_nll(log_probs(swapped), x, pos))
    return out


def main(argv=None):
    c = configure({k: globals()[k] for k in _config_keys}, argv, keys=_config_keys, prog='probe.py')
    if c['windows'] < 1 or c['batch_size'] < 1:
        fail(f"windows={c['windows']}, batch_size={c['batch_size']}: expected both >= 1")
    if c['out_file']:
        util.check_output(c['out_file'], 'out_file', 'probe.py', c['overwrite'])  # now, not after the probe
    try:
        model, ck = load_checkpoint(c['ckpt'])
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        fail(f"cannot load checkpoint {c['ckpt']!r}: {e}")
    family = model.config.model_type
    if family == 'ar':
        fail(f"{c['ckpt']!r} is an ar checkpoint: its exact NLL by position is evaluate.py's by_position")
    if family == 'mask' and not all(0 <= f <= 1 for f in c['fractions']):
        fail(f"fractions={c['fractions']!r}: expected values in [0, 1]")
    if family != 'mask' and not all(isinstance(t, int) and 1 <= t <= model.config.T for t in c['steps']):
        fail(f"steps={c['steps']!r}: expected integers in [1, T={model.config.T}]")
    ddir, L = checkpoint_data_dir(ck, c['data_dir'], c['ckpt']), model.config.block_size
    try:
        data = TokenWindows(ddir, c['split'], L, vocab_size=model.config.vocab_size)
        check_ids(ddir, c['split'])  # every id of the split now, not a traceback at the window that holds a bad one
        unigram = -torch.from_numpy(unigram_logprobs(ddir, 'train', model.config.vocab_size)).double()
    except (OSError, ValueError) as e:
        fail(f"data of {c['ckpt']!r} ({ddir!r}): {e}")
    n = min(c['windows'], data.num_eval_windows(L))
    gen = torch.Generator().manual_seed(c['seed'])
    pos_gen = torch.Generator().manual_seed(c['seed'])  # its own stream: every family probes the same positions
    levels = c['fractions'] if family == 'mask' else c['steps']
    parts, uni = [], []
    for start in range(0, n, c['batch_size']):
        x = data.eval_batch(start, min(c['batch_size'], n - start), L)
        pos = torch.randint(0, L, (len(x),), generator=pos_gen)
        parts.append(probe_mask(model, x, pos, levels, gen) if family == 'mask' else
                     probe_noisy(model, x, pos, levels, gen))
        uni.append(unigram[x[torch.arange(len(x)), pos]])
    uni_nats = torch.cat(uni).mean().item()
    head = f"{c['ckpt']} ({family}, iteration {ck.get('iter_num')}): {n} {c['split']} windows, one position each; " \
           f"unigram cross-entropy of those tokens {uni_nats:.3f} nats"
    rows = []
    if family == 'mask':
        lines = ['| others masked | -log p(x_l), nats |', '|---|---|']
        for f in levels:
            v, se = mean_se(torch.cat([p[f] for p in parts]))
            rows.append({'fraction': f, 'nats': v, 'se': se})
            lines.append(f"| {f:.0%} | {v:.3f} ± {fmt(se)} |")
    else:
        lines = ['| t | own context | another window\'s context | gain from context |', '|---|---|---|---|']
        for t in levels:
            own, other = (torch.cat([p[t][k] for p in parts]) for k in (0, 1))
            (o, o_se), (a, a_se), (g, g_se) = mean_se(own), mean_se(other), mean_se(other - own)
            rows.append({'t': t, 'own': o, 'own_se': o_se, 'other': a, 'other_se': a_se, 'gain': g, 'gain_se': g_se})
            lines.append(f"| {t} | {o:.3f} ± {fmt(o_se)} | {a:.3f} ± {fmt(a_se)} | {g:+.3f} ± {fmt(g_se)} |")
    print(head + '\n' + '\n'.join(lines))
    result = {'config': c, 'family': family, 'iter_num': ck.get('iter_num'), 'windows': n,
              'unigram_nats': uni_nats, 'rows': rows}
    if c['out_file']:
        util.write_json(c['out_file'], result)
    return result


if __name__ == '__main__':
    util.line_buffered_stdout()
    util.run_script(main, 'probe.py')
