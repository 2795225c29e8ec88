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
Several machines: the same command on each, with torchrun's --nnodes, --node_rank and --rdzv_endpoint (README).

Settings are the globals below; config files and --key=value override them (see configurator.py).
Derived settings (data_dir, lr_decay_iters, min_lr, device, dtype) are filled in after the overrides.
iter_num counts optimizer steps done: a checkpoint written at iter_num N holds the weights after N steps.
"""

import copy
import dataclasses
import glob
import hashlib
import json
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import configure
from model import ModelConfig, build_model, load_checkpoint, save_checkpoint
from util import (autocast_context, check_writable, keep_freed_memory, line_buffered_stdout, lock_dir,
                  measure_peak_flops, resolve_device)
from prepare import TokenWindows, load_meta, one_line, unigram_logprobs

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
# model: the same names and defaults as model.ModelConfig (see there for what each does)
model_type = 'embed'            # embed | bits | analog | mask | ar
vocab_size = 50257              # must be >= the data's vocab_size (meta.json)
block_size = 256                # tokens per training sequence (ar reads block_size + 1 per window)
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.0
bias = True
rotary = False                  # rotary position embedding instead of a learned absolute one
T = 1000                        # diffusion steps (embed, bits, analog)
noise_schedule = 'sqrt'         # linear | cosine | sqrt (sqrt: Diffusion-LM's, the default; bits use cosine)
predict = 'x0'                  # embed: eps | x0
embed_dim = 64                  # embed: width of the diffused embedding
self_cond = True                # embed / analog: self-conditioning
cfg_drop = 0.0                  # embed: >0 trains a prompt channel for classifier-free guidance
analog_scale = 1.0              # analog: bits map to -scale / +scale
mask_schedule = 'loglinear'     # mask: loglinear | cosine
time_cond = False               # mask: condition the network on t
# optimizer (AdamW; weight decay on matrices only, see model.configure_optimizers)
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


def fail(msg):
    raise SystemExit(f"train.py: {msg}")


def main(argv=None):
    # -------------------------------------------------------------------------------------------------
    # configuration: overrides, then derived settings and checks
    ddp = 'RANK' in os.environ and 'WORLD_SIZE' in os.environ  # launched by torchrun
    rank = int(os.environ.get('RANK', 0)) if ddp else 0
    # a copy of the defaults, so main() can run twice in one process (tests) with different arguments
    c = configure({k: globals()[k] for k in _config_keys}, argv, keys=_config_keys, verbose=rank == 0,
                  prog='train.py')

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
    if device_type == 'cpu':
        keep_freed_memory()  # large tensors are reused instead of re-mapped at every step (see util.py)
    world_size = int(os.environ['WORLD_SIZE']) if ddp else 1
    ga = c['gradient_accumulation_steps']
    if ga % world_size:
        # it counts micro-batches per optimizer step over all ranks, so each rank must get the same whole number;
        # rounding up (not failing) lets one config serve any number of ranks, and the log says what a step is
        c['gradient_accumulation_steps'] = -(-ga // world_size) * world_size
        if rank == 0:
            print(f"train.py: gradient_accumulation_steps={ga} rounded up to {c['gradient_accumulation_steps']}, "
                  f"a multiple of the {world_size} DDP ranks: {c['gradient_accumulation_steps']} micro-batches of "
                  f"batch_size={c['batch_size']} x block_size={c['block_size']} tokens per optimizer step")

    # -------------------------------------------------------------------------------------------------
    # out_dir, before any work: writable, taken by no other run, and no checkpoint a fresh run would replace
    ckpt_path = os.path.join(c['out_dir'], 'ckpt.pt')
    if c['init_from'] == 'scratch' and not c['overwrite'] and os.path.exists(ckpt_path):
        fail(f"{ckpt_path} exists and init_from='scratch' would replace it: continue it with --init_from=resume, "
             f"replace it with --overwrite=True, or use another out_dir")
    release = None
    if rank == 0 and not c['eval_only']:
        check_writable(c['out_dir'], 'out_dir', 'train.py', is_dir=True)
        release = lock_dir(c['out_dir'], 'train.py')
        # temp files of saves that a kill -9 interrupted (ours now: the lock says no other run writes here)
        stale = glob.glob(os.path.join(glob.escape(c['out_dir']), '.ckpt.pt.*.tmp'))
        for f in stale:
            os.remove(f)
        if stale:
            print(f"train.py: removed {len(stale)} temp file(s) of an interrupted save from {c['out_dir']}")

    # -------------------------------------------------------------------------------------------------
    # processes: DDP when launched by torchrun; every rank trains on its own windows, rank 0 logs and writes
    local_rank = 0
    if ddp:
        local_rank = int(os.environ.get('LOCAL_RANK', 0))
        if device_type == 'cuda':
            c['device'] = f'cuda:{local_rank}'
            torch.cuda.set_device(c['device'])
        be = c['backend'] if c['backend'] != 'auto' else ('nccl' if device_type == 'cuda' else 'gloo')
        dist.init_process_group(backend=be)
    try:
        result = _train(c, ddp, rank, world_size, device_type)
        if ddp:
            # no rank tears down its gloo/NCCL connections while another still talks on them: a rank that
            # destroyed its group early made the other abort ('terminate called without an active exception')
            dist.barrier()
        return result
    finally:
        if ddp and dist.is_initialized():
            dist.destroy_process_group()
        if release is not None:
            release()


def _train(c, ddp, rank, world_size, device_type):
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    device = c['device']
    ga_steps = c['gradient_accumulation_steps'] // world_size  # micro-batches per rank per step
    ptdtype = getattr(torch, c['dtype'])
    ctx = autocast_context(device_type, c['dtype'])
    ckpt_path = os.path.join(c['out_dir'], 'ckpt.pt')
    if c['max_iters'] == 0 and not c['eval_only']:
        log("train.py: max_iters=0: no training steps; the initial weights are evaluated and saved as iteration 0")

    # -------------------------------------------------------------------------------------------------
    # data: meta.json is checked first, so a missing or foreign directory fails before any model is built
    if not os.path.isdir(c['data_dir']):
        fail(f"data_dir {c['data_dir']!r} does not exist; write it with prepare.py "
             f"(e.g. python prepare.py --input=... ) or set --dataset / --data_dir")
    try:
        meta = load_meta(c['data_dir'])
    except (OSError, ValueError, KeyError) as e:
        fail(f"data_dir {c['data_dir']!r}: {e}")

    # -------------------------------------------------------------------------------------------------
    # model: fresh, or rebuilt from the checkpoint by the shared loader
    model_keys = [f.name for f in dataclasses.fields(ModelConfig)]
    missing = [k for k in model_keys if k not in c]
    if missing:
        fail(f"ModelConfig fields {missing} have no config global in train.py")
    model_args = {k: c[k] for k in model_keys}
    ckpt = None
    if c['init_from'] == 'resume':
        if not os.path.isfile(ckpt_path):
            fail(f"init_from='resume' but there is no checkpoint at {ckpt_path}")
        try:
            model, ckpt = load_checkpoint(ckpt_path, device='cpu', use_ema=False)
        except (OSError, ValueError) as e:
            fail(f"cannot resume: {e}")
        # the model is the checkpoint's: a shape setting that says otherwise is a mistake, not a silent choice
        # (dropout only changes training, so it may differ)
        differ = [(k, c[k], v) for k, v in ckpt['model_args'].items() if k in c and c[k] != v and k != 'dropout']
        if differ:
            fail("resume: " + "; ".join(f"{k}={a!r} in the config but {b!r} in {ckpt_path}" for k, a, b in differ) +
                 ": a resumed run keeps the checkpoint's model; drop the override, or start a fresh run elsewhere")
        c.update(ckpt['model_args'])
        model_args = dict(ckpt['model_args'])
        old = ckpt.get('meta') or {}
        for k in ('tokenizer', 'vocab_size', 'eot_token'):
            if k in old and k in meta and old[k] != meta[k]:
                fail(f"the checkpoint was trained on data with {k}={old[k]!r} but {c['data_dir']}/meta.json "
                     f"says {meta[k]!r}")
    else:
        torch.manual_seed(c['seed'])  # identical initial weights on every rank (DDP also broadcasts rank 0's)
        try:
            model = build_model(ModelConfig(**model_args))
        except (ValueError, TypeError) as e:
            fail(f"invalid model configuration: {e}")
    model.to(device)
    raw_model = model
    window = c['block_size'] + raw_model.extra_tokens
    tokens_per_iter = c['batch_size'] * c['block_size'] * ga_steps * world_size

    try:
        train_data = TokenWindows(c['data_dir'], 'train', window, vocab_size=c['vocab_size'])
        val_data = TokenWindows(c['data_dir'], 'val', window, vocab_size=c['vocab_size'])
    except (OSError, ValueError, KeyError) as e:
        fail(f"data_dir {c['data_dir']!r} does not fit the model (block_size={c['block_size']}, "
             f"window={window}, vocab_size={c['vocab_size']}): {e}")

    def to_device(x):
        if device_type == 'cuda':
            return x.pin_memory().to(device, non_blocking=True)
        return x.to(device)

    def get_batch(loader, step, seed, r):
        try:  # the reader checks every batch's ids against the vocabulary
            return to_device(loader.random_batch(c['batch_size'], step=step, seed=seed, rank=r))
        except ValueError as e:
            fail(str(e))

    # the baseline: a unigram model of the train split, scored on the very tokens the val loss predicts (ar
    # predicts all but a window's first token), so a curve that stays at this line has learned no context.
    # Counting reads every train id once, so it also checks them all against the vocabulary
    try:
        unigram = torch.from_numpy(unigram_logprobs(c['data_dir'], 'train', c['vocab_size']))
    except ValueError as e:
        fail(str(e))
    eval_windows = [get_batch(val_data, k, _EVAL_SEED, 0)[:, raw_model.extra_tokens:].cpu()
                    for k in range(c['eval_iters'])]
    unigram_nats = -torch.cat([unigram[x.flatten()] for x in eval_windows]).mean().item()
    unigram_bits = unigram_nats / math.log(2)

    # -------------------------------------------------------------------------------------------------
    # optimizer, loss scaling, EMA, compile, DDP
    optimizer = raw_model.configure_optimizers(c['weight_decay'], c['learning_rate'], (c['beta1'], c['beta2']),
                                               device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=c['dtype'] == 'float16')
    ema = None
    if c['ema_decay'] > 0:
        ema = copy.deepcopy(raw_model).requires_grad_(False).eval()
    iter_num, best_val_loss, last_saved, train_seconds = 0, float('inf'), None, 0.0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt['optimizer'])
        if ckpt.get('scaler'):
            scaler.load_state_dict(ckpt['scaler'])
        if ema is not None:
            if ckpt.get('ema') is not None:
                ema.load_state_dict(ckpt['ema'])
            else:
                log("resume: the checkpoint has no EMA; the EMA starts from the current weights")
        iter_num, best_val_loss = ckpt['iter_num'], ckpt['best_val_loss']
        train_seconds = ckpt.get('train_seconds', 0.0)
        last_saved = iter_num
        changed = {k: v for k, v in (ckpt.get('config') or {}).items()
                   if k in c and c[k] != v and k not in ('init_from', 'eval_only')}
        if changed:
            log("resume: settings that differ from the checkpoint's run: " +
                ", ".join(f"{k}={c[k]!r} (was {v!r})" for k, v in changed.items()))
        del ckpt  # free the host copy of the weights and optimizer state
    start_iter = iter_num

    model = raw_model
    if c['compile']:
        log("compiling the model with torch.compile ...")
        model = torch.compile(raw_model, mode=c['compile_mode'])
    eval_model = model  # (compiled if asked) without the DDP wrapper: evaluation needs no gradient sync
    if ddp:
        model = DDP(model, device_ids=[int(device.split(':')[1])] if device_type == 'cuda' else None)

    # -------------------------------------------------------------------------------------------------
    # logging
    log(f"model_type={c['model_type']}: {raw_model.get_num_params() / 1e6:.2f}M parameters (non-embedding), "
        f"device={device}, dtype={c['dtype']}, compile={c['compile']}, ranks={world_size}")
    split_tokens = {k: v.get('tokens') for k, v in meta.get('splits', {}).items()}
    log(f"data: {c['data_dir']}: {split_tokens} tokens, "
        f"window {window}; {tokens_per_iter:,} tokens per iteration "
        f"({world_size} ranks x {ga_steps} micro-batches x {c['batch_size']} x {c['block_size']})")
    log(f"unigram baseline on the val windows: {unigram_nats:.4f} nats/token = {unigram_bits:.4f} bits/token "
        f"(a unigram model of the train split; the val loss of mask and ar is in the same nats)")
    peak = c['peak_flops']
    if master and peak == 0 and not c['eval_only']:
        peak = measure_peak_flops(device, ptdtype)
        log(f"measured peak {peak / 1e12:.3f} TFLOP/s ({c['dtype']} matmul on {device}) for MFU")
    writer = wandb = clearml = None
    if master and not c['eval_only']:
        os.makedirs(c['out_dir'], exist_ok=True)
        if c['tensorboard_log']:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step hides events a killed run logged after its last checkpoint (all of them for a fresh
            # run with overwrite=True: step 0)
            writer = SummaryWriter(os.path.join(c['out_dir'], 'tb'), purge_step=iter_num)
        if c['wandb_log']:
            import wandb
            wandb.init(project=c['wandb_project'], name=c['wandb_run_name'], config=c)
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
            clearml = Task.init(project_name=c['clearml_project'], task_name=c['clearml_task'],
                                auto_connect_frameworks=False, auto_connect_arg_parser=False,
                                auto_connect_streams=False, auto_resource_monitoring=False, reuse_last_task_id=False)
            clearml.connect(dict(c), name='config')  # the config as hyperparameters

    def scalars(d, step):
        if writer is not None:
            for k, v in d.items():
                writer.add_scalar(k, v, step)
        if wandb is not None:
            wandb.log(d, step=step)
        if clearml is not None:
            for k, v in d.items():  # 'train/loss' -> the plot 'train', series 'loss', as TensorBoard groups it
                title, _, series = k.rpartition('/')
                clearml.get_logger().report_scalar(title or k, series, v, iteration=step)

    # -------------------------------------------------------------------------------------------------
    # evaluation: the same windows and the same noise every time, so successive numbers are comparable;
    # the eval batches are shared out over the ranks and the sums all-reduced
    @torch.no_grad()
    def estimate_loss():
        out = {}
        jobs = [('train', train_data, eval_model), ('val', val_data, eval_model)]
        if ema is not None:
            jobs.append(('val_ema', val_data, ema))
        for name, loader, m in jobs:
            m.eval()
            total = torch.zeros((), dtype=torch.float64, device=device)
            for k in range(rank, c['eval_iters'], world_size):
                X = get_batch(loader, k, _EVAL_SEED, 0)
                torch.manual_seed(stream_seed(_EVAL_SEED, k))
                with ctx:
                    total += m(X).double()
            if ddp:
                dist.all_reduce(total)
            out[name] = total.item() / c['eval_iters']
        if c['eval_bound']:
            # held-out bits/token by the family's bound (exact for ar), with the weights sampling would use
            m = ema if ema is not None else raw_model
            total = torch.zeros((), dtype=torch.float64, device=device)
            for k in range(rank, c['eval_iters'], world_size):
                gen = torch.Generator(device=device).manual_seed(stream_seed(_EVAL_SEED, 1, k))
                total += m.nll(get_batch(val_data, k, _EVAL_SEED, 0), generator=gen).double().mean()
            if ddp:
                dist.all_reduce(total)
            out['val_bits'] = total.item() / c['eval_iters']
        model.train()
        return out

    log_path = os.path.join(c['out_dir'], 'eval_log.jsonl')

    def log_eval(record):
        """One JSON line per evaluation (out_dir/eval_log.jsonl), the data of the convergence curves."""
        try:
            with open(log_path, 'a') as f:
                f.write(json.dumps(record) + '\n')
        except OSError as e:
            fail(f"cannot write {log_path}: {one_line(e)} (disk full?)")

    def save(iter_num):
        ckpt = {
            'model_args': model_args,
            'model': raw_model.state_dict(),
            'ema': ema.state_dict() if ema is not None else None,
            'optimizer': optimizer.state_dict(),
            'scaler': scaler.state_dict(),
            'iter_num': iter_num,
            'best_val_loss': best_val_loss,
            'train_seconds': train_seconds,
            'config': dict(c),
            'meta': meta,
        }
        try:
            save_checkpoint(ckpt_path, ckpt)
        except (OSError, RuntimeError) as e:  # torch reports a full disk as RuntimeError('... unexpected pos ...')
            fail(f"cannot write {ckpt_path} at iteration {iter_num}: {one_line(e)}: is the disk full? The previous "
                 f"checkpoint, if any, is left as it was")

    if ddp:
        # a safety check: every rank must draw its own windows, else DDP only repeats work
        first = get_batch(train_data, iter_num * ga_steps, c['seed'], rank)
        prints = [None] * world_size
        dist.all_gather_object(prints, fingerprint([first]))
        log(f"ddp: {world_size} ranks, first micro-batch fingerprints {prints}")
        if len(set(prints)) != world_size:
            fail("DDP ranks drew identical training windows; TokenWindows.random_batch must depend on rank")

    # -------------------------------------------------------------------------------------------------
    # training loop
    if master and not c['eval_only']:
        # a resumed run drops the evaluations its killed predecessor logged after the checkpoint
        old = open(log_path).read().splitlines() if os.path.exists(log_path) else []
        keep = [line for line in old if line.strip() and c['init_from'] == 'resume' and json.loads(line)['iter'] <= iter_num]
        with open(log_path, 'w') as f:
            f.writelines(line + '\n' for line in keep)
    model.train()
    t_last, iters_timed, t_start = time.time(), 0, time.time()
    while True:
        lr = get_lr(iter_num, c)
        for group in optimizer.param_groups:
            group['lr'] = lr

        # evaluate at every eval_interval and at the end; a resumed run already evaluated its first iteration
        resumed_here = c['init_from'] == 'resume' and iter_num == start_iter
        if c['eval_only'] or ((iter_num % c['eval_interval'] == 0 or iter_num == c['max_iters'])
                              and not resumed_here):
            losses = estimate_loss()
            ema_part = f", val (EMA) {losses['val_ema']:.4f}" if 'val_ema' in losses else ""
            bits_part = f", val {losses['val_bits']:.3f} bits/token (unigram {unigram_bits:.3f})" \
                if 'val_bits' in losses else ""
            log(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}{ema_part}{bits_part}")
            if c['eval_only']:
                break
            scalars({f'eval/{k}_loss': v for k, v in losses.items() if k != 'val_bits'}, iter_num)
            if 'val_bits' in losses:
                scalars({'eval/val_bits_per_token': losses['val_bits'], 'eval/unigram_bits_per_token': unigram_bits},
                        iter_num)
            if master:
                log_eval({'iter': iter_num, 'tokens': iter_num * tokens_per_iter, 'train_seconds': train_seconds,
                          **losses, 'unigram_bits': unigram_bits, 'model_type': c['model_type']})
            # the checkpoint is judged by the weights that sampling will use: the EMA's, when there is one
            score = losses.get('val_ema', losses['val'])
            if (iter_num > 0 or c['max_iters'] == 0) and (score < best_val_loss or c['always_save_checkpoint']):
                best_val_loss = min(best_val_loss, score)
                if master:
                    save(iter_num)
                    log(f"saved {ckpt_path} (iteration {iter_num})")
                last_saved = iter_num
            t_last, iters_timed = time.time(), 0  # evaluation time is not training time
        if iter_num >= c['max_iters']:
            break

        # one optimizer step: ga_steps micro-batches on this rank, gradients averaged over ranks at the last.
        # The diffusion noise and times are a pure function of (seed, rank, iter_num), and the windows of
        # (seed, rank, global micro-step), so a resumed run continues both streams exactly.
        torch.manual_seed(stream_seed(c['seed'], rank, iter_num))
        t_step = time.time()
        loss_sum = torch.zeros((), device=device)
        for micro_step in range(ga_steps):
            X = get_batch(train_data, iter_num * ga_steps + micro_step, c['seed'], rank)
            if ddp:
                model.require_backward_grad_sync = micro_step == ga_steps - 1
            with ctx:
                loss = model(X) / ga_steps
            loss_sum += loss.detach().float()
            scaler.scale(loss).backward()
        if ddp:
            dist.all_reduce(loss_sum)  # the mean over ranks: all ranks agree on it, and so stop together
            loss_sum /= world_size
        log_now = (iter_num + 1) % c['log_interval'] == 0
        if log_now:
            # the loop's one host sync, every log_interval steps (a GPU is never left waiting on Python for the
            # loss in between); every rank reads the same reduced loss, so all stop together
            lossf = loss_sum.item()
            if not math.isfinite(lossf):
                where = f"iteration {last_saved}" if last_saved is not None else "none written yet"
                every = f" (checked every {c['log_interval']} iterations)" if c['log_interval'] > 1 else ""
                fail(f"non-finite loss ({lossf}) at iteration {iter_num}{every}; stopping. {ckpt_path} is left as "
                     f"it was (last checkpoint: {where})")
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(),
                                                   c['grad_clip'] if c['grad_clip'] > 0 else float('inf'))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            # EMA warmup: the decay ramps up so that short runs get a useful average too
            d = min(c['ema_decay'], (1 + iter_num) / (10 + iter_num))
            with torch.no_grad():
                for e, p in zip(ema.parameters(), raw_model.parameters()):
                    e.lerp_(p.detach(), 1.0 - d)
                for e, b in zip(ema.buffers(), raw_model.buffers()):
                    e.copy_(b)
        iter_num += 1
        iters_timed += 1
        train_seconds += time.time() - t_step
        if iter_num == start_iter + 1:
            log(f"first training iteration done {time.time() - t_start:.1f} s after the start of training "
                f"(compilation included)")

        if log_now and master:
            dt = (time.time() - t_last) / iters_timed
            mfu = raw_model.estimate_mfu(c['batch_size'] * ga_steps, dt, peak) if peak > 0 else 0.0
            if mfu > 1.0:
                # faster than the peak: the probe at the start ran while the machine was busy (or peak_flops was
                # set too low); the fastest rate seen is the better estimate of the peak, so MFU never passes 100%
                log(f"train.py: {mfu * peak / 1e12:.4g} TFLOP/s achieved, above the peak {peak / 1e12:.4g} TFLOP/s; "
                    f"using it as the peak from now on")
                peak, mfu = mfu * peak, 1.0
            gn = grad_norm.item()
            log(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms/iter, "
                f"{tokens_per_iter / dt:,.0f} tok/s, mfu {mfu * 100:.2f}%, grad norm {gn:.3f}")
            scalars({'train/loss': lossf, 'train/lr': lr, 'train/grad_norm': gn, 'perf/ms_per_iter': dt * 1000,
                     'perf/tokens_per_s': tokens_per_iter / dt, 'perf/mfu': mfu}, iter_num)
            t_last, iters_timed = time.time(), 0

    if ddp and not c['eval_only']:
        # buffers that each rank's own forward updates (the bound's time-proposal statistics) follow rank 0's, as
        # DDP's broadcast at every forward already makes them; then a safety check: DDP must leave every rank
        # with bitwise identical weights
        for buf in raw_model.buffers():
            dist.broadcast(buf, 0)
        prints = [None] * world_size
        dist.all_gather_object(prints, fingerprint(raw_model.state_dict().values()))
        log(f"ddp: final weight fingerprints {prints}" +
            (" (identical on all ranks)" if len(set(prints)) == 1 else " DIFFER"))
        if len(set(prints)) != 1:
            fail("DDP ranks ended with different weights")
    if writer is not None:
        writer.close()
    if wandb is not None:
        wandb.finish()
    if clearml is not None:
        clearml.close()
    return best_val_loss


if __name__ == '__main__':
    line_buffered_stdout()
    main()
