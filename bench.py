"""
How fast does each family train and sample, against what this machine can do at best?

    python bench.py                                   # every family, fp32 and bf16, on this machine's device
    python bench.py --device=cuda --compile=True --json=bench.json
    python bench.py --families="['ar','mask']" --dtypes="['float32']" --iters=20

At the start a timed matmul probe measures the peak FLOP/s of the device in each dtype
(system.measure_peak_flops): MFU is reported against that, not against a datasheet number the machine never reaches.
Then, for each family at the same backbone size:
  training   ms per iteration (forward + backward + AdamW step; warmup iterations excluded, the median of
             `iters`), tokens/s, MFU (system.flops_per_token(model) x tokens / time / peak of the dtype), and the
             time relative to `ar` in the same dtype; in float32 and bf16 autocast (CUDA float32 = TF32
             matmuls, as in train.py);
  sampling   tokens/s and network evaluations for batch_size samples of block_size tokens at sample_steps
             steps (ar: one step per token, with its KV cache);
and once: `mask` sampling at cache_steps steps for one block_size sequence with and without the cache that
skips the network when no token was revealed since its last call (the ratio of the times), and prepare.py's
tokenizer throughput on prepare_text against raw single-process tiktoken (encode_ordinary document by
document). Prints the tables; --json=PATH writes everything as JSON, replacing only bench.py's own results unless
overwrite=True, and never a checkpoint, a split, a meta.json or another script's output (checkpoint.check_output).
"""

import contextlib
import functools
import io
import os
import re
import statistics
import tempfile
import time

import torch

from checkpoint import check_output, write_json
from configurator import configure
from model import build_model
from prepare import DEFAULTS as PREPARE_DEFAULTS, TokenWindows, find_text_files, get_encoding, prepare, read_text_file
import system
from system import (autocast_context, estimate_mfu, flops_per_token, line_buffered_stdout, measure_peak_flops,
                    resolve_device, run_script, sync)
from train import configure_optimizer

# -----------------------------------------------------------------------------------------------------
# config globals; --key=value overrides them
families = ['ar', 'embed', 'bits', 'analog', 'mask']  # model families to time
dtypes = ['float32', 'bfloat16']  # training / sampling precisions ('float16' on CUDA too)
n_layer = 6                 # the backbone every family shares
n_head = 6
n_embd = 384
block_size = 256
batch_size = 8
vocab_sizes = [50257]       # vocabularies to time every family at: [50257, 6208] sets GPT-2's beside the compact
                            # one of the TinyStories sample (prepare.py --vocab=compact), each row's time / ar at its own
data_dir = ''               # '' -> random token batches; else windows of data_dir/train.bin
warmup = 3                  # untimed iterations first (allocator, thread pools, autotuning)
iters = 10                  # timed iterations; the median is reported
sample_steps = 20           # steps of the sampling benchmark (ar ignores it); 0 skips sampling
cache_steps = 1000          # steps of the mask cached-vs-uncached comparison; 0 skips it
prepare_text = 'corpus/tinystories'  # text file or directory for the tokenizer benchmark; '' skips it
prepare_procs = 0           # prepare.py's processes; 0 = all cores (its default)
peak_seconds = 1.0          # duration of each matmul peak probe
device = 'auto'             # 'auto' (cuda if available) | 'cpu' | 'cuda' | 'cuda:1' ...
threads = 0                 # CPU threads for torch (torch.set_num_threads); 0 = torch's default (all cores)
compile = False             # also time each family's training step under torch.compile (beside eager)
compile_mode = 'default'    # torch.compile mode (see train.py)
seed = 1337
json = ''                   # write the results to this path ('' = only print)
overwrite = False           # let json replace a file that is not bench.py's own results (checkpoint.check_output)
_config_keys = [k for k, v in list(globals().items())
                if not k.startswith('_') and isinstance(v, (bool, int, float, str, list, tuple))]
# -----------------------------------------------------------------------------------------------------


fail = functools.partial(system.fail, 'bench.py')


def timed(fn, dev):
    sync(dev)
    t0 = time.perf_counter()
    out = fn()
    sync(dev)
    return time.perf_counter() - t0, out


def make_batches(c, window, n, vocab_size):
    if c['data_dir']:
        data = TokenWindows(c['data_dir'], 'train', window, vocab_size=vocab_size)
        return [data.random_batch(c['batch_size'], step=i, seed=c['seed']) for i in range(n)]
    g = torch.Generator().manual_seed(c['seed'])
    return [torch.randint(0, vocab_size, (c['batch_size'], window), generator=g) for _ in range(n)]


def bench_training(model, c, dev, ctx, compiled=False):
    """(median seconds of one optimizer step (forward, backward, AdamW) after c['warmup'] untimed ones, seconds
    of the first step: with compiled=True that one includes the compilation)."""
    device_type = torch.device(dev).type
    opt = configure_optimizer(model, 0.1, 3e-4, (0.9, 0.95), device_type)
    run = torch.compile(model, mode=c['compile_mode']) if compiled else model
    batches = [x.to(dev) for x in make_batches(c, c['block_size'] + model.extra_tokens, 4, model.config.vocab_size)]
    model.train()
    times = []
    for i in range(c['warmup'] + c['iters']):
        x = batches[i % len(batches)]

        def step():
            with ctx:
                loss = run(x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        dt, _ = timed(step, dev)
        if i == 0:
            first = dt
        if i >= c['warmup']:
            times.append(dt)
    return statistics.median(times), first


@torch.no_grad()
def bench_sampling(model, c, dev, ctx, n, length, steps, **options):
    """(seconds, NFE) of one sampler call, after a short untimed warm-up call."""
    model.eval()
    gen = torch.Generator(device=dev).manual_seed(c['seed'])
    fixed = model.fixed_steps  # ar: the length sets the steps
    with ctx:
        model.sample(1, min(4, length), steps=None if fixed else 1, generator=gen, **options)
        dt, _ = timed(lambda: model.sample(n, length, steps=None if fixed else steps, generator=gen, **options), dev)
    return dt, model.nfe


def bench_prepare(path, procs):
    """prepare.py on a text file or directory (its whole pipeline: reading, splitting, hashing, tokenizing in
    `procs` processes, writing) vs a plain loop of tiktoken's encode_ordinary over the same documents."""
    texts = []
    for name, _ in find_text_files(path):
        texts.append(read_text_file(name))  # decompressed here, so the raw loop is charged no decompression
    enc = get_encoding()  # loaded once up front, so neither side is charged for building the BPE tables
    with tempfile.TemporaryDirectory() as tmp:
        procs = procs or PREPARE_DEFAULTS['num_proc']
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            meta = prepare(input=path, out_dir=os.path.join(tmp, 'data'), num_proc=procs)
        dt = time.perf_counter() - t0
    tokens = sum(s['tokens'] for s in meta['splits'].values())
    t0 = time.perf_counter()
    docs = [d.strip() for text in texts  # documents as prepare.py splits them
            for d in re.split(r'\n[ \t]*<\|endoftext\|>[ \t\r]*(?=\n|\Z)', '\n' + text)]
    raw = sum(1 + len(enc.encode_ordinary(d)) for d in docs if d)  # 1: the <|endoftext|> before each document
    raw_dt = time.perf_counter() - t0
    return {'text': path, 'bytes': sum(len(t.encode('utf-8')) for t in texts), 'num_proc': procs,
            'tokens': tokens, 'seconds': dt, 'tokens_per_s': tokens / dt, 'raw_tokens': raw,
            'raw_seconds': raw_dt, 'raw_tokens_per_s': raw / raw_dt, 'ratio': (tokens / dt) / (raw / raw_dt)}


def fmt(v, spec):
    return '-' if v is None else format(v, spec)


def tables(res):
    c = res['config']
    lines = [f"device {res['device']}, backbone {c['n_layer']} x {c['n_embd']} ({c['n_head']} heads), "
             f"block_size {c['block_size']}, batch {c['batch_size']}, vocab {' and '.join(map(str, c['vocab_sizes']))}, "
             f"{'real' if c['data_dir'] else 'random'} tokens, median of {c['iters']} iterations",
             "peak (matmul probe): " + ', '.join(f"{d} {p / 1e12:.3f} TFLOP/s" for d, p in res['peak_flops'].items()),
             '',
             '| family | vocab | dtype | params (M) | train ms/iter | train tok/s | MFU | time / ar '
             '| compiled ms/iter | first compiled step (s) | sample steps | NFE | sample tok/s |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    for r in res['train']:
        lines.append(f"| {r['family']} | {r['vocab_size']} | {r['dtype']} | {r['params'] / 1e6:.2f} | {r['ms_per_iter']:.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['mfu'] * 100:.1f}% | {fmt(r['vs_ar'], '.2f')} | "
                     f"{fmt(r.get('compiled_ms_per_iter'), '.1f')} | {fmt(r.get('first_compiled_step_s'), '.1f')} | "
                     f"{fmt(r['sample_steps'], 'd')} | {fmt(r['sample_nfe'], 'd')} | "
                     f"{fmt(r['sample_tokens_per_s'], ',.0f')} |")
    lines += ['', '| measure | value | target |', '|---|---|---|']
    for m in res['summary']:
        lines.append(f"| {m['measure']} | {m['value']} | {m['target']} |")
    return '\n'.join(lines)


def summarise(res):
    """The figures the project's targets are about, as (measure, value, target) rows."""
    sizes = res['config']['vocab_sizes']
    big, small = max(sizes), min(sizes)
    rows = {(r['family'], r['dtype'], r['vocab_size']): r for r in res['train']}
    out = []
    peak32 = res['peak_flops'].get('float32')
    if ('ar', 'float32', big) in rows:
        out.append((f'ar float32 MFU (of the measured fp32 matmul peak), vocab {big}',
                    f"{rows[('ar', 'float32', big)]['mfu'] * 100:.1f}%", '>= 70%'))
    for f in res['config']['families']:
        if (f, 'float32', big) in rows and (f, 'bfloat16', big) in rows:
            speedup = rows[(f, 'float32', big)]['ms_per_iter'] / rows[(f, 'bfloat16', big)]['ms_per_iter']
            out.append((f'{f} bf16 speedup over float32 (training), vocab {big}', f'{speedup:.2f}x', '>= 1.3x'))
    for (f, d, v), r in rows.items():
        if r.get('compiled_ms_per_iter'):
            out.append((f'{f} {d} compiled speedup over eager (training), vocab {v}',
                        f"{r['ms_per_iter'] / r['compiled_ms_per_iter']:.2f}x", ''))
    for (f, d, v), r in rows.items():
        if v == small and small < big and (f, d, big) in rows:  # the compact vocabulary's gain, family by family
            out.append((f'{f} {d} training step, vocab {big} / vocab {small}',
                        f"{rows[(f, d, big)]['ms_per_iter'] / r['ms_per_iter']:.2f}x", '>= 3x'))
    for (f, d, v), r in rows.items():
        if f != 'ar' and r['vs_ar'] is not None:
            target = '<= 3x' if f == 'embed' and v == small and small < big else ''
            out.append((f'{f} {d} training time / ar, vocab {v}', f"{r['vs_ar']:.2f}x", target))
    if res.get('mask_cache'):
        m = res['mask_cache']
        out.append((f"mask sampling, {m['steps']} steps, {m['length']} tokens: uncached / cached time",
                    f"{m['ratio']:.2f}x ({m['uncached_seconds']:.2f} s, NFE {m['uncached_nfe']} vs "
                    f"{m['cached_seconds']:.2f} s, NFE {m['cached_nfe']})", '>= 2x'))
    if res.get('prepare'):
        p = res['prepare']
        out.append((f"prepare.py ({p['num_proc']} processes) vs raw single-process tiktoken, tokens/s",
                    f"{p['tokens_per_s']:,.0f} vs {p['raw_tokens_per_s']:,.0f} ({p['ratio']:.2f}x)", ''))
    if peak32:
        out.append(('measured fp32 matmul peak', f"{peak32 / 1e12:.3f} TFLOP/s", ''))
    return [{'measure': a, 'value': b, 'target': t} for a, b, t in out]


def bench_family(c, family, d, shape, dev, device_type, peak):
    """One family at one dtype and vocabulary (shape['vocab_size']): eager (and compiled) training step time, MFU,
    and sampling speed."""
    ctx = autocast_context(device_type, d)
    torch.manual_seed(c['seed'])
    try:
        model = build_model({**shape, 'model_type': family}).to(dev)
    except ValueError as e:
        fail(f"family {family!r}: {e}")
    dt, _ = bench_training(model, c, dev, ctx)
    row = {'family': family, 'dtype': d, 'vocab_size': shape['vocab_size'], 'params': model.get_num_params(),
           'ms_per_iter': dt * 1000,
           'tokens_per_s': c['batch_size'] * c['block_size'] / dt,
           'mfu': estimate_mfu(model, c['batch_size'], dt, peak),
           'flops_per_token': flops_per_token(model), 'vs_ar': None,
           'sample_steps': None, 'sample_nfe': None, 'sample_tokens_per_s': None,
           'compiled_ms_per_iter': None, 'first_compiled_step_s': None}
    if c['compile']:
        torch._dynamo.reset()  # each family compiles from scratch: the first step's time is honest
        dtc, first = bench_training(model, c, dev, ctx, compiled=True)
        row.update(compiled_ms_per_iter=dtc * 1000, first_compiled_step_s=first)
    if c['sample_steps'] > 0:
        steps = c['block_size'] if model.fixed_steps else c['sample_steps']
        st, nfe = bench_sampling(model, c, dev, ctx, c['batch_size'], c['block_size'], steps)
        row.update(sample_steps=steps, sample_nfe=nfe, sample_tokens_per_s=c['batch_size'] * c['block_size'] / st)
    print(f"{family} {d} vocab {shape['vocab_size']}: {row['ms_per_iter']:.1f} ms/iter, {row['tokens_per_s']:,.0f} tok/s, "
          f"MFU {row['mfu'] * 100:.1f}%, sampling {fmt(row['sample_tokens_per_s'], ',.0f')} tok/s")
    return row


def main(argv=None):
    c = configure({k: globals()[k] for k in _config_keys}, argv, keys=_config_keys, prog='bench.py')
    if not c['families'] or not c['dtypes'] or not c['vocab_sizes']:
        fail("families, dtypes and vocab_sizes must be non-empty lists")
    if not all(isinstance(v, int) and v >= 2 for v in c['vocab_sizes']):
        fail(f"vocab_sizes={c['vocab_sizes']!r}: expected a list of ints >= 2")
    for d in c['dtypes']:
        if d not in ('float32', 'bfloat16', 'float16'):
            fail(f"dtypes: {d!r} is not 'float32', 'bfloat16' or 'float16'")
    for key in ('iters', 'batch_size', 'block_size'):
        if c[key] < 1:
            fail(f"{key}={c[key]}, expected >= 1")
    for d in c['dtypes']:
        dev, device_type, _ = resolve_device(c['device'], d, prog='bench.py')
    if c['json']:  # now, not after minutes of timing
        check_output(c['json'], 'json', 'bench.py', c['overwrite'])
    if c['threads'] > 0:
        torch.set_num_threads(c['threads'])
    torch.manual_seed(c['seed'])
    res = {'config': c, 'device': dev if device_type != 'cuda' else torch.cuda.get_device_name(dev),
           'threads': torch.get_num_threads(), 'peak_flops': {}, 'train': []}

    if c['prepare_text']:
        # first, while this process is small: prepare.py forks its workers from it
        if not os.path.exists(c['prepare_text']):
            fail(f"prepare_text={c['prepare_text']!r} does not exist ('' skips the tokenizer benchmark)")
        res['prepare'] = p = bench_prepare(c['prepare_text'], c['prepare_procs'])
        print(f"prepare.py: {p['tokens_per_s']:,.0f} tokens/s with {p['num_proc']} process(es); "
              f"raw tiktoken {p['raw_tokens_per_s']:,.0f} tokens/s")

    for d in c['dtypes']:
        res['peak_flops'][d] = measure_peak_flops(dev, d, seconds=c['peak_seconds'])
        print(f"peak {d}: {res['peak_flops'][d] / 1e12:.3f} TFLOP/s (on an idle machine: train.py "
              f"--peak_flops={res['peak_flops'][d]:.4g} gives its MFU)")

    shape = {k: c[k] for k in ('n_layer', 'n_head', 'n_embd', 'block_size')}
    for v in c['vocab_sizes']:
        for family in c['families']:
            for d in c['dtypes']:
                res['train'].append(bench_family(c, family, d, {**shape, 'vocab_size': v}, dev, device_type,
                                                 res['peak_flops'][d]))
    ar_ms = {(r['dtype'], r['vocab_size']): r['ms_per_iter'] for r in res['train'] if r['family'] == 'ar'}
    for r in res['train']:
        if (r['dtype'], r['vocab_size']) in ar_ms:
            r['vs_ar'] = r['ms_per_iter'] / ar_ms[(r['dtype'], r['vocab_size'])]

    if c['cache_steps'] > 0 and 'mask' in c['families']:
        torch.manual_seed(c['seed'])
        model = build_model({**shape, 'vocab_size': c['vocab_sizes'][0], 'model_type': 'mask'}).to(dev)
        ctx = autocast_context(device_type, c['dtypes'][0])
        t_on, n_on = bench_sampling(model, c, dev, ctx, 1, c['block_size'], c['cache_steps'], cached=True)
        t_off, n_off = bench_sampling(model, c, dev, ctx, 1, c['block_size'], c['cache_steps'], cached=False)
        res['mask_cache'] = {'steps': c['cache_steps'], 'length': c['block_size'], 'dtype': c['dtypes'][0],
                             'cached_seconds': t_on, 'cached_nfe': n_on, 'uncached_seconds': t_off,
                             'uncached_nfe': n_off, 'ratio': t_off / t_on}
        print(f"mask sampling at {c['cache_steps']} steps: cached {t_on:.2f} s (NFE {n_on}), "
              f"uncached {t_off:.2f} s (NFE {n_off})")
        del model

    res['summary'] = summarise(res)
    print()
    print(tables(res))
    if c['json']:
        write_json(c['json'], res)
        print(f"wrote {c['json']}")
    return res


if __name__ == '__main__':
    line_buffered_stdout()
    run_script(main, 'bench.py')
