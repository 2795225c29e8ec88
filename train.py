"""
Train any model family of model.py (embed | bits | analog | mask | ar) on the token streams prepare.py writes.

One process (CPU or one GPU):
    python train.py config/embed_cpu.py
    python train.py config/embed_cpu.py --batch_size=16 --dtype=bfloat16 --compile=True
DDP on one node (NCCL on GPUs, gloo on CPU):
    torchrun --standalone --nproc_per_node=8 train.py config/dit_tinystories.py
    torchrun --standalone --nproc_per_node=2 train.py config/embed_cpu.py --device=cpu
Continue a run (same schedule, optimizer, EMA and data stream), or only evaluate its checkpoint:
    python train.py config/embed_cpu.py --init_from=resume
    python train.py config/embed_cpu.py --init_from=resume --eval_only=True
A fresh run into an out_dir that holds a checkpoint stops unless told to replace it:
    python train.py config/embed_cpu.py --overwrite=True
Ctrl-C (SIGINT) or SIGTERM stops a run at the next step boundary: it saves the current iteration, removes its lock
and prints the --init_from=resume command that continues it (under DDP every rank stops, rank 0 saves); a second
signal stops at once, leaving the previous checkpoint as it was.
Several machines: the same command on each, with torchrun's --nnodes, --node_rank and --rdzv_endpoint (README).

Settings are the globals below; config files and --key=value override them (see configurator.py).
Derived settings (data_dir, lr_decay_iters, min_lr, device, dtype) are filled in after the overrides.
iter_num counts optimizer steps done: a checkpoint written at iter_num N holds the weights after N steps.
"""

import copy
import dataclasses
import functools
import glob
import hashlib
import json
import math
import os
import sys
import time
import types

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import load_checkpoint, save_checkpoint
from configurator import configure
from model import ModelConfig, build_model
import util
from util import (autocast_context, check_writable, keep_freed_memory, line_buffered_stdout, lock_dir,
                  measure_peak_flops, resolve_device)
from prepare import PrepareError, TokenWindows, Vocab, check_ids, load_meta, one_line, unigram_logprobs

# -----------------------------------------------------------------------------------------------------
# config globals; every one may be overridden by a config file or --key=value
# I/O
out_dir = 'out'                 # checkpoint (ckpt.pt) and TensorBoard events (tb/) go here
eval_interval = 250             # evaluate (and maybe checkpoint) every this many iterations
log_interval = 10               # print / log training stats every this many iterations
eval_iters = 20                 # batches per split in each evaluation (the same windows every time)
eval_bound = True               # also score the val windows by the family's bound (bits/token, beside the unigram)
eval_only = False               # evaluate the checkpoint in out_dir and exit (needs init_from='resume')
always_save_checkpoint = False  # checkpoint at every evaluation, not only when the val loss improves
init_from = 'scratch'           # 'scratch' (fresh weights) | 'resume' (continue from out_dir/ckpt.pt)
overwrite = False               # let a fresh run replace the checkpoint in out_dir (else it stops and says so)
# logging
tensorboard_log = True          # TensorBoard scalars under out_dir/tb (rank 0 only)
wandb_log = False               # Weights & Biases (imported only when True)
wandb_project = 'diffusion-lm'
wandb_run_name = 'run'
clearml_log = False             # ClearML: the same scalars, the config as hyperparameters (imported only when True)
clearml_project = 'diffusion-lm'
clearml_task = 'run'
clearml_offline = False         # ClearML offline mode: a local session folder instead of a server (import it later
                                # with Task.import_offline_session)
# data
dataset = 'tinystories'         # data/<dataset>/ as written by prepare.py
data_dir = ''                   # '' -> data/<dataset>; else an explicit directory with {train,val}.bin + meta.json
batch_size = 32                 # sequences per micro-batch per process
gradient_accumulation_steps = 1 # micro-batches per optimizer step, in total over all DDP ranks (rounded up to a
                                # multiple of the number of ranks, with a message)
# model: every field of model.ModelConfig is a setting of the same name and default (see there for each)
globals().update({f.name: f.default for f in dataclasses.fields(ModelConfig)})
vocab_size = 0                  # 0 -> the data's vocab_size (meta.json): 50,257 for GPT-2's ids, ~8k for a compact one
# optimizer (AdamW; weight decay on matrices only, see util.configure_optimizer)
learning_rate = 6e-4            # peak learning rate
max_iters = 5000                # total optimizer steps (0: none; the initial weights are evaluated and saved)
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0                 # clip the global gradient norm at this value; 0 disables
# learning-rate schedule: linear warmup, then cosine decay to min_lr
decay_lr = True                 # False keeps learning_rate constant (no warmup either)
warmup_iters = 100
lr_decay_iters = -1             # -1 -> max_iters
min_lr = -1.0                   # -1 -> learning_rate / 10
ema_decay = 0.0                 # EMA of the weights (e.g. 0.9999 as in DiT); 0 disables
# system
device = 'auto'                 # 'auto' (cuda if available, else cpu) | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
dtype = 'auto'                  # 'auto' | 'float32' | 'bfloat16' | 'float16' (see derived settings below)
compile = False                 # torch.compile the model
compile_mode = 'default'        # torch.compile mode: 'default' | 'reduce-overhead' (CUDA graphs, for small models on
                                # a GPU, where launches dominate) | 'max-autotune' | 'max-autotune-no-cudagraphs'
seed = 1337                     # weights init, data stream and diffusion noise
backend = 'auto'                # DDP backend: 'auto' (nccl on cuda, gloo on cpu) | 'nccl' | 'gloo'
peak_flops = 0.0                # peak FLOP/s per device for MFU; 0 -> measure with a matmul probe at start
_config_keys = [k for k, v in list(globals().items())
                if not k.startswith('_') and isinstance(v, (bool, int, float, str, list, tuple))]
# -----------------------------------------------------------------------------------------------------

_EVAL_SEED = 0xE7A1  # the eval windows and noise do not depend on `seed`, so runs with different seeds compare


def get_lr(it, cfg):
    """Linear warmup over warmup_iters, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if not cfg['decay_lr']:
        return cfg['learning_rate']
    if it < cfg['warmup_iters']:
        return cfg['learning_rate'] * (it + 1) / (cfg['warmup_iters'] + 1)
    if it >= cfg['lr_decay_iters']:
        return cfg['min_lr']
    ratio = (it - cfg['warmup_iters']) / (cfg['lr_decay_iters'] - cfg['warmup_iters'])
    return cfg['min_lr'] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg['learning_rate'] - cfg['min_lr'])


def stream_seed(*parts):
    """A well-mixed 63-bit seed from integers, so (seed, rank, step) streams never collide or correlate."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0]) >> 1


def fingerprint(tensors):
    """Short hash of the exact bytes of some tensors: equal iff bitwise equal (used to compare DDP ranks)."""
    h = hashlib.sha1()
    for t in tensors:
        h.update(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


fail = functools.partial(util.fail, 'train.py')


def check_config(c, rank, world_size):
    """Fail in one line on a bad setting, then fill in the derived ones (data_dir, lr_decay_iters, min_lr, device,
    dtype, gradient_accumulation_steps rounded to the ranks). Returns the device type."""
    if c['init_from'] not in ('scratch', 'resume'):
        fail(f"init_from={c['init_from']!r}, expected 'scratch' or 'resume'")
    if c['eval_only'] and c['init_from'] != 'resume':
        fail("eval_only=True evaluates the checkpoint in out_dir: also set --init_from=resume")
    if c['compile_mode'] not in ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs'):
        fail(f"compile_mode={c['compile_mode']!r}, expected 'default', 'reduce-overhead', 'max-autotune' or "
             f"'max-autotune-no-cudagraphs'")
    if c['backend'] not in ('auto', 'nccl', 'gloo'):
        fail(f"backend={c['backend']!r}, expected 'auto', 'nccl' or 'gloo'")
    for key in ('batch_size', 'gradient_accumulation_steps', 'eval_interval', 'log_interval', 'eval_iters'):
        if c[key] < 1:
            fail(f"{key}={c[key]}, expected >= 1")
    for key in ('max_iters', 'warmup_iters', 'seed'):
        if c[key] < 0:
            fail(f"{key}={c[key]}, expected >= 0")
    if not 0.0 <= c['ema_decay'] < 1.0:
        fail(f"ema_decay={c['ema_decay']}, expected in [0, 1) (0 disables the EMA)")
    for key, v in c.items():  # a NaN from a config file passes every comparison below; inf is no setting either
        if isinstance(v, float) and not math.isfinite(v):
            fail(f"{key}={v}, expected a finite number")
    if c['learning_rate'] <= 0:
        fail(f"learning_rate={c['learning_rate']}, expected > 0")
    for key in ('grad_clip', 'peak_flops'):
        if c[key] < 0:
            fail(f"{key}={c[key]}, expected >= 0")

    c['data_dir'] = c['data_dir'] or os.path.join('data', c['dataset'])
    if c['lr_decay_iters'] < 0:
        c['lr_decay_iters'] = c['max_iters']
    if c['min_lr'] < 0:
        c['min_lr'] = c['learning_rate'] / 10
    c['device'], device_type, c['dtype'] = resolve_device(c['device'], c['dtype'])
    ga = c['gradient_accumulation_steps']
    if ga % world_size:
        # it counts micro-batches per optimizer step over all ranks, so each rank must get the same whole number;
        # rounding up (not failing) lets one config serve any number of ranks, and the log says what a step is
        c['gradient_accumulation_steps'] = -(-ga // world_size) * world_size
        if rank == 0:
            print(f"train.py: gradient_accumulation_steps={ga} rounded up to {c['gradient_accumulation_steps']}, "
                  f"a multiple of the {world_size} DDP ranks: {c['gradient_accumulation_steps']} micro-batches of "
                  f"batch_size={c['batch_size']} x block_size={c['block_size']} tokens per optimizer step")
    return device_type


def claim_out_dir(c, rank):
    """Before any work: out_dir writable, taken by no other run, and no checkpoint a fresh run would replace.
    Returns the lock's release function (None where this process holds no lock)."""
    ckpt_path = os.path.join(c['out_dir'], 'ckpt.pt')
    if c['init_from'] == 'scratch' and not c['overwrite'] and os.path.exists(ckpt_path):
        fail(f"{ckpt_path} exists and init_from='scratch' would replace it: continue it with --init_from=resume, "
             f"replace it with --overwrite=True, or use another out_dir")
    if rank != 0 or c['eval_only']:
        return None
    created = not os.path.exists(c['out_dir'])  # a run that fails before writing anything removes it again
    check_writable(c['out_dir'], 'out_dir', 'train.py', is_dir=True)
    release = lock_dir(c['out_dir'], 'train.py', created)
    # temp files of saves that a kill -9 interrupted (ours now: the lock says no other run writes here)
    stale = glob.glob(os.path.join(glob.escape(c['out_dir']), '.ckpt.pt.*.tmp'))
    for f in stale:
        os.remove(f)
    if stale:
        print(f"train.py: removed {len(stale)} temp file(s) of an interrupted save from {c['out_dir']}")
    return release


def launched_by_torchrun():
    return 'RANK' in os.environ and 'WORLD_SIZE' in os.environ


def main(argv=None):
    ddp = launched_by_torchrun()
    rank = int(os.environ.get('RANK', 0)) if ddp else 0
    world_size = int(os.environ['WORLD_SIZE']) if ddp else 1
    # a copy of the defaults, so main() can run twice in one process (tests) with different arguments
    c = configure({k: globals()[k] for k in _config_keys}, argv, keys=_config_keys, verbose=rank == 0,
                  prog='train.py')
    device_type = check_config(c, rank, world_size)
    if device_type == 'cpu':
        keep_freed_memory()  # large tensors are reused instead of re-mapped at every step (see util.py)
    release = claim_out_dir(c, rank)
    # processes: DDP when launched by torchrun; every rank trains on its own windows, rank 0 logs and writes
    if ddp:
        if device_type == 'cuda':
            c['device'] = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(c['device'])
        be = c['backend'] if c['backend'] != 'auto' else ('nccl' if device_type == 'cuda' else 'gloo')
        dist.init_process_group(backend=be)
    try:
        with util.GracefulStop(enabled=not c['eval_only']) as stop:
            result = train(c, ddp, rank, world_size, device_type, stop, util.resume_command(argv, world_size))
        if ddp:
            # no rank tears down its gloo/NCCL connections while another still talks on them (the exit after
            # main(), at the end of this file, covers the other teardown race: gloo's workers against Python's)
            dist.barrier()
        return result
    except util.StopNow as e:  # a second signal before the run could say more (in train(), it does)
        fail(f"a second {util.GracefulStop.name(e.signum)}: stopped at once; {os.path.join(c['out_dir'], 'ckpt.pt')} "
             f"is left as it was")
    finally:
        if ddp and dist.is_initialized():
            dist.destroy_process_group()
        if release is not None:
            release()


# -----------------------------------------------------------------------------------------------------
# data and model

def read_meta(c):
    """meta.json first, so a missing or foreign directory fails before any model is built."""
    if not os.path.isdir(c['data_dir']):
        fail(f"data_dir {c['data_dir']!r} does not exist; write it with prepare.py "
             f"(e.g. python prepare.py --input=... ) or set --dataset / --data_dir")
    try:
        return load_meta(c['data_dir'])
    except (OSError, ValueError, KeyError) as e:
        fail(f"data_dir {c['data_dir']!r}: {e}")


def open_windows(c, window):
    try:
        return (TokenWindows(c['data_dir'], 'train', window, vocab_size=c['vocab_size']),
                TokenWindows(c['data_dir'], 'val', window, vocab_size=c['vocab_size']))
    except (OSError, ValueError, KeyError) as e:
        fail(f"data_dir {c['data_dir']!r} does not fit the model (block_size={c['block_size']}, "
             f"window={window}, vocab_size={c['vocab_size']}): {e}")


def get_batch(run, loader, step, seed, r):
    """A batch of windows on the device; the reader checks every batch's ids against the vocabulary."""
    try:
        x = loader.random_batch(run.c['batch_size'], step=step, seed=seed, rank=r)
    except ValueError as e:
        fail(str(e))
    if run.device_type == 'cuda':
        return x.pin_memory().to(run.device, non_blocking=True)
    return x.to(run.device)


def build_or_resume(c, meta, ckpt_path):
    """A fresh model, or the checkpoint's (by the shared loader) with its model settings taken into c.
    Returns (model, model_args, ckpt or None)."""
    model_args = {f.name: c[f.name] for f in dataclasses.fields(ModelConfig)}
    if c['init_from'] == 'scratch':
        torch.manual_seed(c['seed'])  # identical initial weights on every rank (DDP also broadcasts rank 0's)
        try:
            return build_model(ModelConfig(**model_args)), model_args, None
        except (ValueError, TypeError) as e:
            fail(f"invalid model configuration: {e}")
    if not os.path.isfile(ckpt_path):
        fail(f"init_from='resume' but there is no checkpoint at {ckpt_path}")
    try:
        model, ckpt = load_checkpoint(ckpt_path, device='cpu', use_ema=False)
    except (OSError, ValueError) as e:
        fail(f"cannot resume: {e}")
    # the model is the checkpoint's: a shape setting that says otherwise is a mistake, not a silent choice
    # (dropout only changes training, so it may differ)
    old = ckpt.get('meta') or {}
    if old and Vocab(old).key != Vocab(meta).key:
        fail(f"{ckpt_path} was trained on {Vocab(old)}, but {c['data_dir']} holds {Vocab(meta)}: its ids mean "
             f"other tokens; resume on the data it was trained on")
    # vocab_size 0 (the data's) takes the checkpoint's, like the settings not given
    differ = [(k, c[k], v) for k, v in ckpt['model_args'].items()
              if k in c and c[k] != v and k != 'dropout' and not (k == 'vocab_size' and c[k] == 0)]
    if differ:
        fail("resume: " + "; ".join(f"{k}={a!r} in the config but {b!r} in {ckpt_path}" for k, a, b in differ) +
             ": a resumed run keeps the checkpoint's model; drop the override, or start a fresh run elsewhere")
    c.update(ckpt['model_args'])
    for k in ('tokenizer', 'vocab_size', 'eot_token'):
        if k in old and k in meta and old[k] != meta[k]:
            fail(f"the checkpoint was trained on data with {k}={old[k]!r} but {c['data_dir']}/meta.json "
                 f"says {meta[k]!r}")
    return model, dict(ckpt['model_args']), ckpt


def restore(run, ckpt, log):
    """Optimizer, loss scaler, EMA, counters and clock from a checkpoint; reports settings that changed."""
    c = run.c
    run.optimizer.load_state_dict(ckpt['optimizer'])
    if ckpt.get('scaler'):
        run.scaler.load_state_dict(ckpt['scaler'])
    if run.ema is not None:
        if ckpt.get('ema') is not None:
            run.ema.load_state_dict(ckpt['ema'])
        else:
            log("resume: the checkpoint has no EMA; the EMA starts from the current weights")
    run.iter_num, run.best_val_loss = ckpt['iter_num'], ckpt['best_val_loss']
    run.train_seconds = ckpt.get('train_seconds', 0.0)
    run.last_saved = run.iter_num
    changed = {k: v for k, v in (ckpt.get('config') or {}).items()
               if k in c and c[k] != v and k not in ('init_from', 'eval_only')}
    if changed:
        log("resume: settings that differ from the checkpoint's run: " +
            ", ".join(f"{k}={c[k]!r} (was {v!r})" for k, v in changed.items()))


def unigram_baseline(run):
    """The baseline: a unigram model of the train split, scored on the very tokens the val loss predicts (ar
    predicts all but a window's first token), so a curve that stays at this line has learned no context.
    Counting reads every train id once, so it also checks them all against the vocabulary; the val ids are checked
    too, so a corrupt split stops the run now rather than at some evaluation. Returns nats per token of the data's
    ids (the unit of the val loss), bits per GPT-2 token and bits per byte (None without the tokenizer), the units
    of val_bits (prepare.Vocab)."""
    c = run.c
    try:
        unigram = torch.from_numpy(unigram_logprobs(c['data_dir'], 'train', c['vocab_size']))
        check_ids(c['data_dir'], 'val')
    except ValueError as e:
        fail(str(e))
    skip = run.raw_model.extra_tokens
    x = torch.cat([get_batch(run, run.val_data, k, _EVAL_SEED, 0)[:, skip:].cpu() for k in range(c['eval_iters'])])
    nats = -unigram[x]
    bits = nats / math.log(2) + run.vocab.gpt2_bits(x)
    per_byte = bits.sum().item() / run.token_bytes[x].sum().item() if run.token_bytes is not None else None
    return nats.mean().item(), bits.mean().item(), per_byte


# -----------------------------------------------------------------------------------------------------
# logging, evaluation, checkpoints

class Loggers:
    """TensorBoard, wandb and ClearML (rank 0, each only when asked): the same scalars to each."""

    def __init__(self, c, iter_num, enabled=True):
        self.writer = self.wandb = self.clearml = None
        if not enabled:
            return
        if c['tensorboard_log']:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step hides events a killed run logged after its last checkpoint (all of them for a fresh
            # run with overwrite=True: step 0)
            self.writer = SummaryWriter(os.path.join(c['out_dir'], 'tb'), purge_step=iter_num)
        if c['wandb_log']:
            import wandb
            wandb.init(project=c['wandb_project'], name=c['wandb_run_name'], config=c)
            self.wandb = wandb
        if c['clearml_log']:
            try:
                from clearml import Task
            except ImportError:
                fail("clearml_log=True needs the clearml package: pip install -r requirements-optional.txt")
            if c['clearml_offline']:
                Task.set_offline(True)
            # report from a thread, not from the process ClearML forks by default on Linux: a fork of this
            # multi-threaded process (torch's thread pools) hung at Task.close() in about half of the test runs
            Task._report_subprocess_enabled = False
            # ClearML's automatic hooks off: it would otherwise capture the console and upload every torch.save
            self.clearml = Task.init(project_name=c['clearml_project'], task_name=c['clearml_task'],
                                     auto_connect_frameworks=False, auto_connect_arg_parser=False,
                                     auto_connect_streams=False, auto_resource_monitoring=False,
                                     reuse_last_task_id=False)
            self.clearml.connect(dict(c), name='config')  # the config as hyperparameters

    def scalars(self, d, step):
        if self.writer is not None:
            for k, v in d.items():
                self.writer.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(d, step=step)
        if self.clearml is not None:
            for k, v in d.items():  # 'train/loss' -> the plot 'train', series 'loss', as TensorBoard groups it
                title, _, series = k.rpartition('/')
                self.clearml.get_logger().report_scalar(title or k, series, v, iteration=step)

    def close(self):
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.clearml is not None:
            self.clearml.close()


def all_reduced_mean(run, total):
    if run.ddp:
        dist.all_reduce(total)
    return total.item() / run.c['eval_iters']


@torch.no_grad()
def estimate_loss(run):
    """Train and val losses (and the EMA's), and val bits/token by the family's bound (exact for ar), with the
    weights sampling would use. The same windows and the same noise every time, so successive numbers are
    comparable; the eval batches are shared out over the ranks and the sums all-reduced."""
    c, out = run.c, {}
    jobs = [('train', run.train_data, run.eval_model), ('val', run.val_data, run.eval_model)]
    if run.ema is not None:
        jobs.append(('val_ema', run.val_data, run.ema))
    for name, loader, m in jobs:
        m.eval()
        total = torch.zeros((), dtype=torch.float64, device=run.device)
        for k in range(run.rank, c['eval_iters'], run.world_size):
            X = get_batch(run, loader, k, _EVAL_SEED, 0)
            torch.manual_seed(stream_seed(_EVAL_SEED, k))
            with run.ctx:
                total += m(X).double()
        out[name] = all_reduced_mean(run, total)
    if c['eval_bound']:
        # one draw of the bound per window; the windows' spread gives the standard error, because the per-window
        # bound is right-skewed and a mean of a few dozen single draws can sit well below the test-split figure.
        # Bits per GPT-2 token (a compact vocabulary's <|unk|> charged its share of the unseen ids, prepare.Vocab)
        m, skip = (run.ema if run.ema is not None else run.raw_model), run.raw_model.extra_tokens
        sums = torch.zeros(5, dtype=torch.float64, device=run.device)  # windows, sum, sum of squares, bits, bytes
        for k in range(run.rank, c['eval_iters'], run.world_size):
            gen = torch.Generator(device=run.device).manual_seed(stream_seed(_EVAL_SEED, 1, k))
            X = get_batch(run, run.val_data, k, _EVAL_SEED, 0)
            bits = m.position_nll(X, generator=gen).double() + run.vocab.gpt2_bits(X[:, skip:])
            nbytes = run.token_bytes.to(run.device)[X[:, skip:]].sum() if run.token_bytes is not None else 0.0
            window = bits.mean(1)
            sums += torch.stack([torch.tensor(float(window.numel()), dtype=torch.float64, device=run.device),
                                 window.sum(), window.square().sum(), bits.sum(),
                                 torch.as_tensor(nbytes, dtype=torch.float64, device=run.device)])
        if run.ddp:
            dist.all_reduce(sums)
        n, mean = sums[0].item(), (sums[1] / sums[0]).item()
        var = max(sums[2].item() / n - mean * mean, 0.0) * n / max(n - 1, 1)  # unbiased sample variance
        out['val_bits'], out['val_bits_se'] = mean, math.sqrt(var / n)
        if run.token_bytes is not None:
            out['val_bits_per_byte'] = (sums[3] / sums[4]).item()
    run.model.train()
    return out


def append_eval_log(path, record):
    """One JSON line per evaluation (out_dir/eval_log.jsonl), the data of the convergence curves."""
    try:
        with open(path, 'a') as f:
            f.write(json.dumps(record) + '\n')
    except OSError as e:
        fail(f"cannot write {path}: {one_line(e)} (disk full?)")


def restart_eval_log(path, c, iter_num):
    """A fresh run starts the log empty; a resumed one drops what its killed predecessor logged after the
    checkpoint."""
    old = open(path).read().splitlines() if os.path.exists(path) else []
    keep = [line for line in old if line.strip() and c['init_from'] == 'resume' and json.loads(line)['iter'] <= iter_num]
    with open(path, 'w') as f:
        f.writelines(line + '\n' for line in keep)


def save(run, iter_num):
    ckpt = {
        'model_args': run.model_args,
        'model': run.raw_model.state_dict(),
        'ema': run.ema.state_dict() if run.ema is not None else None,
        'optimizer': run.optimizer.state_dict(),
        'scaler': run.scaler.state_dict(),
        'iter_num': iter_num,
        'best_val_loss': run.best_val_loss,
        'train_seconds': run.train_seconds,
        'config': dict(run.c),
        'meta': run.meta,
    }
    try:
        save_checkpoint(run.ckpt_path, ckpt)
    except (OSError, RuntimeError) as e:  # torch reports a full disk as RuntimeError('... unexpected pos ...')
        fail(f"cannot write {run.ckpt_path} at iteration {iter_num}: {one_line(e)}: is the disk full? The previous "
             f"checkpoint, if any, is left as it was")


def evaluate(run, loggers, log):
    """Evaluate, log (stdout, the loggers, eval_log.jsonl) and checkpoint when the score improved (or always)."""
    c, it = run.c, run.iter_num
    # evaluation leaves the buffers as training left them (its forward passes would feed the bound's time proposal),
    # so a checkpoint saved below and evaluated again with eval_only=True gives these very figures
    with util.buffers_kept(run.raw_model, run.ema):
        losses = estimate_loss(run)
    ema_part = f", val (EMA) {losses['val_ema']:.4f}" if 'val_ema' in losses else ""
    bpb = f", {losses['val_bits_per_byte']:.3f} bits/byte (unigram {run.unigram_bpb:.3f})" \
        if 'val_bits_per_byte' in losses else ""
    bits_part = f", val {losses['val_bits']:.3f} ± {losses['val_bits_se']:.3f} bits/token (unigram " \
        f"{run.unigram_bits:.3f}){bpb}" if 'val_bits' in losses else ""
    log(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}{ema_part}{bits_part}")
    if c['eval_only']:
        return
    loggers.scalars({f'eval/{k}_loss': v for k, v in losses.items() if not k.startswith('val_bits')}, it)
    if 'val_bits' in losses:
        loggers.scalars({'eval/val_bits_per_token': losses['val_bits'], 'eval/val_bits_se': losses['val_bits_se'],
                         'eval/unigram_bits_per_token': run.unigram_bits}, it)
    if 'val_bits_per_byte' in losses:
        loggers.scalars({'eval/val_bits_per_byte': losses['val_bits_per_byte'],
                         'eval/unigram_bits_per_byte': run.unigram_bpb}, it)
    if run.rank == 0:
        append_eval_log(run.log_path, {'iter': it, 'tokens': it * run.tokens_per_iter,
                                       'train_seconds': run.train_seconds, **losses,
                                       'unigram_bits': run.unigram_bits, 'unigram_bits_per_byte': run.unigram_bpb,
                                       'model_type': c['model_type']})
    # the checkpoint is judged by the weights that sampling will use: the EMA's, when there is one
    score = losses.get('val_ema', losses['val'])
    if (it > 0 or c['max_iters'] == 0) and (score < run.best_val_loss or c['always_save_checkpoint']):
        run.best_val_loss = min(run.best_val_loss, score)
        if run.rank == 0:
            save(run, it)
            log(f"saved {run.ckpt_path} (iteration {it})")
        run.last_saved = it


# -----------------------------------------------------------------------------------------------------
# the optimizer step

def update_ema(ema, model, ema_decay, iter_num):
    """EMA of the weights, with a warmup of the decay so that short runs get a useful average too; buffers (the
    bound's time-proposal statistics) are copied."""
    d = min(ema_decay, (1 + iter_num) / (10 + iter_num))
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - d)
        for e, b in zip(ema.buffers(), model.buffers()):
            e.copy_(b)


def train_step(run, lr, read_loss):
    """One optimizer step: ga_steps micro-batches on this rank, gradients averaged over ranks at the last.
    The diffusion noise and times are a pure function of (seed, rank, iter_num), and the windows of
    (seed, rank, global micro-step), so a resumed run continues both streams exactly. Returns (loss as a float
    when read_loss else None, grad norm tensor): reading the loss is the loop's one host sync."""
    c, model, ga = run.c, run.model, run.ga_steps
    for group in run.optimizer.param_groups:
        group['lr'] = lr
    torch.manual_seed(stream_seed(c['seed'], run.rank, run.iter_num))
    loss_sum = torch.zeros((), device=run.device)
    for micro_step in range(ga):
        X = get_batch(run, run.train_data, run.iter_num * ga + micro_step, c['seed'], run.rank)
        if run.ddp:
            model.require_backward_grad_sync = micro_step == ga - 1
        with run.ctx:
            loss = model(X) / ga
        loss_sum += loss.detach().float()
        run.scaler.scale(loss).backward()
    if run.ddp:
        dist.all_reduce(loss_sum)  # the mean over ranks: all ranks agree on it, and so stop together
        loss_sum /= run.world_size
    lossf = None
    if read_loss:
        lossf = loss_sum.item()
        if not math.isfinite(lossf):
            where = f"iteration {run.last_saved}" if run.last_saved is not None else "none written yet"
            every = f" (checked every {c['log_interval']} iterations)" if c['log_interval'] > 1 else ""
            fail(f"non-finite loss ({lossf}) at iteration {run.iter_num}{every}; stopping. {run.ckpt_path} is left "
                 f"as it was (last checkpoint: {where})")
    run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(),
                                               c['grad_clip'] if c['grad_clip'] > 0 else float('inf'))
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        update_ema(run.ema, run.raw_model, c['ema_decay'], run.iter_num)
    return lossf, grad_norm


def check_ddp_ranks(run, log, what, tensors, expect_distinct):
    """DDP safety checks: every rank draws its own windows (distinct fingerprints) and ends with bitwise
    identical weights (one fingerprint)."""
    prints = [None] * run.world_size
    dist.all_gather_object(prints, fingerprint(tensors))
    ok = len(set(prints)) == (run.world_size if expect_distinct else 1)
    log(f"ddp: {what} fingerprints {prints}" + ("" if expect_distinct else
                                                 (" (identical on all ranks)" if ok else " DIFFER")))
    if not ok:
        fail("DDP ranks drew identical training windows; TokenWindows.random_batch must depend on rank"
             if expect_distinct else "DDP ranks ended with different weights")


# -----------------------------------------------------------------------------------------------------
# the run

def setup(c, ddp, rank, world_size, device_type, log):
    """Data, model, optimizer, loss scaler, EMA, compile and DDP, gathered in one namespace `run`."""
    run = types.SimpleNamespace(c=c, ddp=ddp, rank=rank, world_size=world_size, device_type=device_type,
                                device=c['device'], ctx=autocast_context(device_type, c['dtype']),
                                ga_steps=c['gradient_accumulation_steps'] // world_size,  # micro-batches per rank
                                ckpt_path=os.path.join(c['out_dir'], 'ckpt.pt'),
                                log_path=os.path.join(c['out_dir'], 'eval_log.jsonl'),
                                iter_num=0, best_val_loss=float('inf'), last_saved=None, train_seconds=0.0)
    run.meta = read_meta(c)
    if c['init_from'] == 'scratch':  # a resumed run takes the checkpoint's
        c['vocab_size'] = c['vocab_size'] or run.meta['vocab_size']
    model, run.model_args, ckpt = build_or_resume(c, run.meta, run.ckpt_path)
    if c['model_type'] == 'ar' and c['vocab_size'] - 1 != run.meta['eot_token']:  # ar reads its last id as BOS
        fail(f"model_type='ar' with vocab_size={c['vocab_size']} reads id {c['vocab_size'] - 1} as <|endoftext|>, but "
             f"{c['data_dir']}/meta.json has eot_token={run.meta['eot_token']}: leave vocab_size=0 (the data's)")
    run.raw_model = model.to(run.device)
    run.window = c['block_size'] + model.extra_tokens
    run.tokens_per_iter = c['batch_size'] * c['block_size'] * run.ga_steps * world_size
    run.train_data, run.val_data = open_windows(c, run.window)
    run.vocab = Vocab(run.meta)
    try:  # bytes of each id's text, for bits per byte: the tokenizer's files are needed
        run.token_bytes = torch.from_numpy(run.vocab.token_bytes(run.meta['splits'].get('val')))
    except PrepareError as e:
        run.token_bytes = None
        log(f"train.py: no bits per byte: {e}")
    run.unigram_nats, run.unigram_bits, run.unigram_bpb = unigram_baseline(run)
    run.optimizer = util.configure_optimizer(model, c['weight_decay'], c['learning_rate'], (c['beta1'], c['beta2']),
                                             device_type)
    run.scaler = torch.amp.GradScaler(device_type, enabled=c['dtype'] == 'float16')
    run.ema = copy.deepcopy(model).requires_grad_(False).eval() if c['ema_decay'] > 0 else None
    if ckpt is not None:
        restore(run, ckpt, log)
        del ckpt  # free the host copy of the weights and optimizer state
    if c['compile']:
        log("compiling the model with torch.compile ...")
        model = torch.compile(model, mode=c['compile_mode'])
    run.eval_model = model  # (compiled if asked) without the DDP wrapper: evaluation needs no gradient sync
    if ddp:
        model = DDP(model, device_ids=[int(run.device.split(':')[1])] if device_type == 'cuda' else None)
    run.model = model
    return run


def describe(run, log):
    c = run.c
    log(f"model_type={c['model_type']}: {run.raw_model.get_num_params() / 1e6:.2f}M parameters (non-embedding), "
        f"device={run.device}, dtype={c['dtype']}, compile={c['compile']}, ranks={run.world_size}")
    split_tokens = {k: v.get('tokens') for k, v in run.meta.get('splits', {}).items()}
    log(f"data: {c['data_dir']}: {split_tokens} tokens, window {run.window}; {run.tokens_per_iter:,} tokens per "
        f"iteration ({run.world_size} ranks x {run.ga_steps} micro-batches x {c['batch_size']} x {c['block_size']})")
    bpb = f", {run.unigram_bpb:.4f} bits/byte" if run.unigram_bpb is not None else ""
    log(f"unigram baseline on the val windows: {run.unigram_nats:.4f} nats/token (a unigram model of the train "
        f"split; the val loss of mask and ar is in the same nats), {run.unigram_bits:.4f} bits per GPT-2 token{bpb}")
    if run.vocab.compact:
        log(f"data: {run.vocab}; bits/token are per GPT-2 token, <|unk|> charged log2({run.vocab.unseen:,}) = "
            f"{run.vocab.unk_bits:.2f} bits more (the GPT-2 ids it stands for)")


def log_iteration(run, loggers, log, lossf, grad_norm, lr, dt, peak):
    """One training log line and its scalars (dt: seconds per iteration); returns the peak FLOP/s for MFU."""
    c = run.c
    mfu = util.estimate_mfu(run.raw_model, c['batch_size'] * run.ga_steps, dt, peak) if peak > 0 else 0.0
    if mfu > 1.0:
        # faster than the peak: the probe at the start ran while the machine was busy (or peak_flops was set too
        # low); the fastest rate seen is the better estimate of the peak, so MFU never passes 100%
        log(f"train.py: {mfu * peak / 1e12:.4g} TFLOP/s achieved, above the peak {peak / 1e12:.4g} TFLOP/s; "
            f"using it as the peak from now on")
        peak, mfu = mfu * peak, 1.0
    gn = grad_norm.item()
    log(f"iter {run.iter_num}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms/iter, "
        f"{run.tokens_per_iter / dt:,.0f} tok/s, mfu {mfu * 100:.2f}%, grad norm {gn:.3f}")
    loggers.scalars({'train/loss': lossf, 'train/lr': lr, 'train/grad_norm': gn, 'perf/ms_per_iter': dt * 1000,
                     'perf/tokens_per_s': run.tokens_per_iter / dt, 'perf/mfu': mfu}, run.iter_num)
    return peak


def stop_and_save(run, stop, resume_cmd):
    """Stop at this step boundary: rank 0 saves the current iteration (atomically; a second signal during the save
    abandons it, leaving the previous checkpoint) and says where it stopped and how to resume; every rank leaves
    with 128 + the signal's number, as a process killed by it would."""
    it, name = run.iter_num, util.GracefulStop.name(stop.signum)
    if run.rank == 0:
        try:
            if run.last_saved != it:
                save(run, it)
        except util.StopNow as e:
            where = f"iteration {run.last_saved}" if run.last_saved is not None else "none written yet"
            fail(f"a second {util.GracefulStop.name(e.signum)} during the save at iteration {it}: stopped without "
                 f"it; {run.ckpt_path} is left as it was (last checkpoint: {where})")
        print(f"train.py: {name}: stopped at iteration {it}, saved in {run.ckpt_path}; resume with: {resume_cmd}",
              file=sys.stderr)
    if run.ddp:
        dist.barrier()  # the other ranks wait for rank 0's save, then all leave together
    raise SystemExit(128 + stop.signum)


def train(c, ddp, rank, world_size, device_type, stop=None, resume_cmd=''):
    master = rank == 0
    stop = stop or util.GracefulStop(enabled=False)
    log = print if master else (lambda *a, **k: None)
    if c['max_iters'] == 0 and not c['eval_only']:
        log("train.py: max_iters=0: no training steps; the initial weights are evaluated and saved as iteration 0")
    run = setup(c, ddp, rank, world_size, device_type, log)
    describe(run, log)
    peak = c['peak_flops']
    if master and peak == 0 and not c['eval_only']:
        peak = measure_peak_flops(run.device, getattr(torch, c['dtype']))
        log(f"measured peak {peak / 1e12:.3f} TFLOP/s ({c['dtype']} matmul on {run.device}) for MFU")
    writes = master and not c['eval_only']
    if writes:
        os.makedirs(c['out_dir'], exist_ok=True)
        restart_eval_log(run.log_path, c, run.iter_num)
    loggers = Loggers(c, run.iter_num, enabled=writes)
    if ddp:
        first = get_batch(run, run.train_data, run.iter_num * run.ga_steps, c['seed'], rank)
        check_ddp_ranks(run, log, f"{world_size} ranks, first micro-batch", [first], expect_distinct=True)

    start_iter = run.iter_num
    run.model.train()
    t_last, iters_timed, t_start = time.time(), 0, time.time()
    while True:
        # evaluate at every eval_interval and at the end; a resumed run already evaluated its first iteration
        it = run.iter_num
        resumed_here = c['init_from'] == 'resume' and it == start_iter
        if c['eval_only'] or ((it % c['eval_interval'] == 0 or it == c['max_iters']) and not resumed_here):
            evaluate(run, loggers, log)
            t_last, iters_timed = time.time(), 0  # evaluation time is not training time
        if c['eval_only'] or it >= c['max_iters']:
            break
        # DDP ranks vote every log_interval steps, where the loop reads the loss anyway (a host sync)
        if stop.requested(run.ddp, it % c['log_interval'] == 0, run.device):
            loggers.close()
            stop_and_save(run, stop, resume_cmd)

        lr = get_lr(it, c)
        log_now = (it + 1) % c['log_interval'] == 0
        t_step = time.time()
        lossf, grad_norm = train_step(run, lr, read_loss=log_now)
        run.iter_num += 1
        iters_timed += 1
        run.train_seconds += time.time() - t_step
        if run.iter_num == start_iter + 1:
            log(f"first training iteration done {time.time() - t_start:.1f} s after the start of training "
                f"(compilation included)")
        if log_now and master:
            peak = log_iteration(run, loggers, log, lossf, grad_norm, lr, (time.time() - t_last) / iters_timed, peak)
            t_last, iters_timed = time.time(), 0

    if ddp and not c['eval_only']:
        # buffers that each rank's own forward updates (the bound's time-proposal statistics) follow rank 0's, as
        # DDP's broadcast at every forward already makes them; then every rank must hold identical weights
        for buf in run.raw_model.buffers():
            dist.broadcast(buf, 0)
        check_ddp_ranks(run, log, "final weight", run.raw_model.state_dict().values(), expect_distinct=False)
    loggers.close()
    return run.best_val_loss


if __name__ == '__main__':
    line_buffered_stdout()
    # Under torchrun a DDP rank leaves without Python's interpreter teardown (util.run_script). Gloo's worker threads
    # free each collective's work object some time after the collective completes, and that object holds a Python
    # reference (its captured thread-local state): a worker that gets there after the interpreter began finalizing
    # cannot take the GIL and aborts the process ('terminate called without an active exception', exit -6), though
    # every step, checkpoint and log line was done (pytorch/pytorch#179291; ~1 run in 4 on a loaded 2-core machine).
    # When main() has returned or exited, the process group is destroyed and the checkpoint and logs are closed and
    # renamed into place, so only the buffered streams need flushing. A one-line error also reaches torchrun's summary.
    util.run_script(main, torchrun=launched_by_torchrun())
