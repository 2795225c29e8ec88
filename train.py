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
Several machines: the same command on each, with torchrun's --nnodes, --node_rank and --rdzv_endpoint (GUIDE.md).

Settings are the globals below, checked and completed by check_settings right after them (the derived ones:
data_dir, lr_decay_iters, min_lr, device, dtype); config files and --key=value override them (configurator.py).
iter_num counts optimizer steps done: a checkpoint written at iter_num N holds the weights after N steps.
train() reads as a run goes: data, model and optimizer, then the loop (evaluate, stop at a signal, one optimizer
step, log); the functions after it are what the loop calls. Where the numbers go: loggers.py; checkpoints, the
out_dir lock and resuming: checkpoint.py; devices, DDP's processes and signals: system.py.
"""

import collections
import copy
import dataclasses
import functools
import math
import os
import sys
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import system
from checkpoint import claim_out_dir, restore_training, resume_checkpoint, save_checkpoint
from configurator import configure
from diffusion import stream_seed
from loggers import Loggers
from model import ModelConfig, build_model
from prepare import PrepareError, TokenWindows, Vocab, check_ids, load_meta, one_line, unigram_logprobs
from system import (GracefulStop, StopNow, autocast_context, check_ddp_ranks, check_final_weights, ddp_processes,
                    estimate_mfu, keep_freed_memory, launched_by_torchrun, line_buffered_stdout, resolve_device,
                    resume_command, run_script)

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
# model: model.ModelConfig's fields, with its defaults (ModelConfig checks their values; a test keeps the two equal)
model_type = 'embed'            # embed | bits | analog | mask | ar (the family classes of model.py, FAMILIES)
vocab_size = 0                  # 0 -> the data's vocab_size (meta.json): 50,257 for GPT-2's ids, ~8k for a compact one;
                                # embedding tables are padded to a multiple of 64
block_size = 256                # sequence length the network sees
n_layer = 6                     # transformer blocks
n_head = 6                      # attention heads
n_embd = 384                    # model width
dropout = 0.0                   # dropout in attention and MLP (0 for pretraining)
bias = True                     # biases in Linear layers
rotary = False                  # rotary position embedding instead of a learned absolute one
T = 1000                        # diffusion steps of the discrete-time process (embed, bits, analog)
continuous_time = False         # embed/analog/bits: real t in [0, T], the bound an integral (diffusion.py);
                                # T then sets the decoder's time t = 1, the bound's cells and the default steps
noise_schedule = 'sqrt'         # linear | cosine | sqrt (Diffusion-LM's; bits configs use cosine)
predict = 'x0'                  # embed/analog: the network predicts eps or x0
embed_dim = 64                  # embed: width of the diffused token embedding (projected to n_embd)
self_cond = True                # embed/analog: feed the previous estimate of x0 back (self-conditioning)
cfg_drop = 0.0                  # embed: >0 trains a prompt-condition channel, dropped with this rate (CFG)
analog_scale = 1.0              # analog: bits are mapped to -scale / +scale
mask_schedule = 'loglinear'     # mask: alpha_t = 1 - t (loglinear) or cos(pi t / 2) (cosine)
time_cond = False               # mask: condition the network on t (MDLM's default is off)
# optimizer (AdamW; weight decay on matrices only, see configure_optimizer)
learning_rate = 6e-4            # peak learning rate
max_iters = 5000                # total optimizer steps (0: none; the initial weights are evaluated and saved)
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0                 # clip the global gradient norm at this value; 0 disables
# learning-rate schedule: linear warmup, then cosine decay to min_lr, or warmup-stable-decay (wsd)
decay_lr = True                 # False keeps learning_rate constant (no warmup either)
lr_schedule = 'cosine'          # 'cosine' | 'wsd': constant after the warmup, then a linear cooldown to min_lr over the
                                # last cooldown_iters steps; the stable phase does not depend on max_iters, so one run
                                # can be extended, or branched into a cooldown at any iteration (sweep.py's branch_from)
warmup_iters = 100
lr_decay_iters = -1             # cosine: -1 -> max_iters
cooldown_iters = 0              # wsd: steps of the final cooldown (0: constant to the end)
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
peak_flops = 0.0                # peak FLOP/s of one device, e.g. bench.py's probe of an idle machine: MFU is logged
                                # against it; 0 -> no MFU (a probe beside a run on a busy machine reads far too low)
_config_keys = [k for k, v in list(globals().items())
                if not k.startswith('_') and isinstance(v, (bool, int, float, str, list, tuple))]
# -----------------------------------------------------------------------------------------------------



# the settings that change no trained weight (where a run writes and logs, when it evaluates, how it runs): the rest,
# as a checkpoint stores them, say whether it is the run a config asks for (sweep.py)
NOT_TRAINING = ('out_dir', 'eval_interval', 'log_interval', 'eval_iters', 'eval_bound', 'eval_only',
                'always_save_checkpoint', 'init_from', 'overwrite', 'tensorboard_log', 'wandb_log', 'wandb_project',
                'wandb_run_name', 'clearml_log', 'clearml_project', 'clearml_task', 'clearml_offline', 'dataset',
                'device', 'compile', 'compile_mode', 'backend', 'peak_flops')
_EVAL_SEED = 0xE7A1  # the eval windows and noise do not depend on `seed`, so runs with different seeds compare
_MIN_BOUND_DRAWS = 64  # draws of the val bound in all, at least: a few single right-skewed draws can read near zero
                       # (an untrained embed over 2 windows: 0.06 bits, over 80: 18.9), so few windows take more each
fail = functools.partial(system.fail, 'train.py')


def check_settings(c, rank, world_size):
    """Fail in one line on a bad setting, then fill in the derived ones: data_dir, lr_decay_iters, min_lr, device and
    dtype ('auto' resolved), gradient_accumulation_steps rounded up to a multiple of the ranks. Returns the device
    type. (sweep.py derives a run's settings, as its checkpoint stores them, with it too.)"""
    if c['init_from'] not in ('scratch', 'resume'):
        fail(f"init_from={c['init_from']!r}, expected 'scratch' or 'resume'")
    if c['eval_only'] and c['init_from'] != 'resume':
        fail("eval_only=True evaluates the checkpoint in out_dir: also set --init_from=resume")
    if c['compile_mode'] not in ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs'):
        fail(f"compile_mode={c['compile_mode']!r}, expected 'default', 'reduce-overhead', 'max-autotune' or "
             f"'max-autotune-no-cudagraphs'")
    if c['lr_schedule'] not in ('cosine', 'wsd'):
        fail(f"lr_schedule={c['lr_schedule']!r}, expected 'cosine' or 'wsd'")
    if c['backend'] not in ('auto', 'nccl', 'gloo'):
        fail(f"backend={c['backend']!r}, expected 'auto', 'nccl' or 'gloo'")
    for key, v in c.items():  # a NaN from a config file passes every comparison below; inf is no setting either
        if isinstance(v, float) and not math.isfinite(v):
            fail(f"{key}={v}, expected a finite number")
    for keys, low in ((('batch_size', 'gradient_accumulation_steps', 'eval_interval', 'log_interval', 'eval_iters'), 1),
                      (('max_iters', 'warmup_iters', 'cooldown_iters', 'seed', 'grad_clip', 'peak_flops'), 0)):
        for key in keys:
            if c[key] < low:
                fail(f"{key}={c[key]}, expected >= {low}")
    if c['learning_rate'] <= 0:
        fail(f"learning_rate={c['learning_rate']}, expected > 0")
    for key, what in (('ema_decay', ' (0 disables the EMA)'), ('beta1', " (AdamW's moment decay)"),
                      ('beta2', " (AdamW's moment decay)")):
        if not 0.0 <= c[key] < 1.0:
            fail(f"{key}={c[key]}, expected in [0, 1){what}")
    if c['cooldown_iters'] > c['max_iters']:
        fail(f"cooldown_iters={c['cooldown_iters']}, expected <= max_iters={c['max_iters']} (the cooldown ends there)")
    if c['seed'] >= 2 ** 64:
        fail(f"seed={c['seed']}, expected < 2**64 (torch's seeds are 64-bit)")

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


def main(argv=None):
    ddp = launched_by_torchrun()
    rank = int(os.environ.get('RANK', 0)) if ddp else 0
    world_size = int(os.environ['WORLD_SIZE']) if ddp else 1
    # a copy of the defaults, so main() can run twice in one process (tests) with different arguments
    c = configure({k: globals()[k] for k in _config_keys}, argv, keys=_config_keys, verbose=rank == 0,
                  prog='train.py')
    device_type = check_settings(c, rank, world_size)
    if device_type == 'cpu':
        keep_freed_memory()  # large tensors are reused instead of re-mapped at every step (system.py)
    release = claim_out_dir(c['out_dir'], replace_ok=c['init_from'] == 'resume' or c['overwrite'],
                            writer=rank == 0 and not c['eval_only'])
    try:
        # processes: DDP when launched by torchrun; every rank trains on its own windows, rank 0 logs and writes
        with ddp_processes(c, ddp, device_type), GracefulStop(enabled=not c['eval_only']) as stop:
            return train(c, ddp, rank, world_size, device_type, stop, resume_command(argv, world_size))
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
            raise
        fail(f"out of memory ({one_line(e)[:120]}): lower batch_size (and raise gradient_accumulation_steps to keep "
             f"the tokens per step) or block_size; {os.path.join(c['out_dir'], 'ckpt.pt')} is left as it was")
    except StopNow as e:  # a second signal before the run could say more (in train(), it does)
        fail(f"a second {GracefulStop.name(e.signum)}: stopped at once; {os.path.join(c['out_dir'], 'ckpt.pt')} "
             f"is left as it was")
    finally:
        if release is not None:
            release()


# -----------------------------------------------------------------------------------------------------
# the run

def train(c, ddp, rank, world_size, device_type, stop, resume_cmd):
    """Data, model and optimizer, then evaluate, stop at a signal, take an optimizer step and log, until max_iters.
    Returns the best val loss."""
    log = print if rank == 0 else (lambda *a, **k: None)
    device, ctx = c['device'], autocast_context(device_type, c['dtype'])
    ckpt_path = os.path.join(c['out_dir'], 'ckpt.pt')
    if c['max_iters'] == 0 and not c['eval_only']:
        log("train.py: max_iters=0: no training steps; the initial weights are evaluated and saved as iteration 0")

    # the data's meta.json first (a missing or foreign data_dir fails before any model is built), the model (fresh, or
    # the checkpoint's), then the splits, checked against its vocabulary
    meta = read_meta(c)  # (and vocab_size=0 becomes the data's)
    model, model_args, ckpt = build_or_resume(c, meta, ckpt_path)
    raw_model = model.to(device)
    data = open_data(c, meta, raw_model.extra_tokens, log)
    ga = c['gradient_accumulation_steps'] // world_size  # micro-batches per optimizer step on this rank
    tokens_per_iter = c['batch_size'] * c['block_size'] * ga * world_size

    optimizer = configure_optimizer(raw_model, c['weight_decay'], c['learning_rate'], (c['beta1'], c['beta2']),
                                    device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=c['dtype'] == 'float16')
    ema = copy.deepcopy(raw_model).requires_grad_(False).eval() if c['ema_decay'] > 0 else None
    iter_num, best_val_loss, last_saved, train_seconds = 0, float('inf'), None, 0.0
    if ckpt is not None:
        restore_training(ckpt, optimizer, scaler, ema, c, log)
        iter_num, best_val_loss = ckpt['iter_num'], ckpt['best_val_loss']
        train_seconds, last_saved = ckpt.get('train_seconds', 0.0), ckpt['iter_num']
        del ckpt  # free the host copy of the weights and optimizer state
    if c['compile']:
        log("compiling the model with torch.compile ...")
        model = torch.compile(model, mode=c['compile_mode'])
    eval_model = model  # (compiled if asked) without the DDP wrapper: evaluation needs no gradient sync
    if ddp:
        model = DDP(model, device_ids=[int(device.split(':')[1])] if device_type == 'cuda' else None)

    log(f"model_type={c['model_type']}: {raw_model.get_num_params() / 1e6:.2f}M parameters (non-embedding), "
        f"device={device}, dtype={c['dtype']}, compile={c['compile']}, ranks={world_size}")
    split_tokens = {k: v.get('tokens') for k, v in meta.get('splits', {}).items()}
    log(f"data: {c['data_dir']}: {split_tokens} tokens, window {data.train.window}; {tokens_per_iter:,} tokens per "
        f"iteration ({world_size} ranks x {ga} micro-batches x {c['batch_size']} x {c['block_size']})")
    bpb = f", {data.unigram_bpb:.4f} bits/byte" if data.unigram_bpb is not None else ""
    log(f"unigram baseline on the val windows: {data.unigram_nats:.4f} nats/token (a unigram model of the train "
        f"split; the val loss of mask and ar is in the same nats), {data.unigram_bits:.4f} bits per GPT-2 token{bpb}")
    if data.vocab.compact:
        log(f"data: {data.vocab}; bits/token are per GPT-2 token, <|unk|> charged log2({data.vocab.unseen:,}) = "
            f"{data.vocab.unk_bits:.2f} bits more (the GPT-2 ids it stands for)")
    writes = rank == 0 and not c['eval_only']  # the process that writes out_dir
    peak = c['peak_flops']  # FLOP/s of one device, for MFU
    if writes:
        log(f"MFU against peak_flops={peak / 1e12:.4g} TFLOP/s, as given" if peak else
            "no MFU: set peak_flops to the peak FLOP/s of one device (bench.py measures it on an idle machine)")
    loggers = Loggers(c, iter_num, enabled=writes)  # (and eval_log.jsonl, restarted at iter_num)

    def checkpoint(it):  # what a save writes: the un-compiled weights, the training state, the settings, the data
        return {'model_args': model_args, 'model': raw_model.state_dict(),
                'ema': ema.state_dict() if ema is not None else None,
                'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(),
                'iter_num': it, 'best_val_loss': best_val_loss, 'train_seconds': train_seconds,
                'config': dict(c), 'meta': meta}

    if ddp:
        first = get_batch(data.train, c, iter_num * ga, c['seed'], rank)
        check_ddp_ranks(world_size, log, f"{world_size} ranks, first micro-batch", [first], expect_distinct=True)
    start_iter = iter_num
    model.train()
    t_last, iters_timed, t_start = time.time(), 0, time.time()
    while True:
        # evaluate at every eval_interval and at the end; a resumed run already evaluated its first iteration
        it = iter_num
        resumed_here = c['init_from'] == 'resume' and it == start_iter
        if c['eval_only'] or ((it % c['eval_interval'] == 0 or it == c['max_iters']) and not resumed_here):
            # evaluation leaves the buffers as training left them (its forward passes would feed the bound's time
            # proposal), so a checkpoint saved below and evaluated again with eval_only=True gives these very figures
            with buffers_kept(raw_model, ema):
                losses = estimate_loss(c, data, eval_model, raw_model, ema, ctx, rank, world_size, ddp)
            log(eval_line(it, losses, data))
            model.train()
            bad = [k for k, v in losses.items() if not math.isfinite(v)]
            if bad:  # a diverged model: nothing of it is logged or saved over the last good checkpoint
                fail(f"non-finite {bad[0]} loss ({losses[bad[0]]}) at the evaluation of iteration {it}; stopping. "
                     f"{kept(ckpt_path, last_saved)}")
            if not c['eval_only']:
                loggers.evaluation(it, losses, tokens=it * tokens_per_iter, train_seconds=train_seconds,
                                   unigram_bits=data.unigram_bits, unigram_bits_per_byte=data.unigram_bpb,
                                   model_type=c['model_type'])
                # the checkpoint is judged by the weights that sampling will use: the EMA's, when there is one
                score = losses.get('val_ema', losses['val'])
                if (it > 0 or c['max_iters'] == 0) and (score < best_val_loss or c['always_save_checkpoint']):
                    best_val_loss = min(best_val_loss, score)
                    if rank == 0:
                        save(ckpt_path, checkpoint(it), raw_model, ema, last_saved)
                        log(f"saved {ckpt_path} (iteration {it})")
                    last_saved = it
            t_last, iters_timed = time.time(), 0  # evaluation time is not training time
        if c['eval_only'] or it >= c['max_iters']:
            break

        # a signal stops the run here, at a step boundary: rank 0 saves this iteration (a second signal during the
        # save abandons it, leaving the previous checkpoint) and says how to resume; every rank leaves with 128 + the
        # signal's number, as a process killed by it would. DDP ranks vote every log_interval steps, where the loop
        # reads the loss anyway (a host sync)
        if stop.requested(ddp, it % c['log_interval'] == 0, device):
            loggers.close()
            if rank == 0:
                try:
                    if last_saved != it:
                        save(ckpt_path, checkpoint(it), raw_model, ema, last_saved)
                except StopNow as e:
                    fail(f"a second {GracefulStop.name(e.signum)} during the save at iteration {it}: stopped without "
                         f"it; {kept(ckpt_path, last_saved)}")
                print(f"train.py: {GracefulStop.name(stop.signum)}: stopped at iteration {it}, saved in {ckpt_path}; "
                      f"resume with: {resume_cmd}", file=sys.stderr)
            if ddp:
                dist.barrier()  # the other ranks wait for rank 0's save, then all leave together
            raise SystemExit(128 + stop.signum)

        # one optimizer step: ga micro-batches on this rank, gradients averaged over the ranks at the last. The
        # diffusion noise and times are a pure function of (seed, rank, iter_num), and the windows of (seed, rank,
        # global micro-step), so a resumed run continues both streams exactly
        lr = get_lr(it, c)
        for group in optimizer.param_groups:
            group['lr'] = lr
        log_now = (it + 1) % c['log_interval'] == 0
        t_step = time.time()
        torch.manual_seed(stream_seed(c['seed'], rank, it))
        loss_sum = torch.zeros((), device=device)
        for micro_step in range(ga):
            X = get_batch(data.train, c, it * ga + micro_step, c['seed'], rank)
            if ddp:
                model.require_backward_grad_sync = micro_step == ga - 1
            with ctx:
                loss = model(X) / ga
            loss_sum += loss.detach().float()
            scaler.scale(loss).backward()
        if ddp:
            dist.all_reduce(loss_sum)  # the mean over ranks: all ranks agree on it, and so stop together
            loss_sum /= world_size
        lossf = loss_sum.item() if log_now else None  # reading the loss is the loop's one host sync
        if log_now and not math.isfinite(lossf):
            every = f" (checked every {c['log_interval']} iterations)" if c['log_interval'] > 1 else ""
            fail(f"non-finite loss ({lossf}) at iteration {it}{every}; stopping. {kept(ckpt_path, last_saved)}")
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(),
                                                   c['grad_clip'] if c['grad_clip'] > 0 else float('inf'))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            update_ema(ema, raw_model, c['ema_decay'], it)
        iter_num += 1
        iters_timed += 1
        train_seconds += time.time() - t_step
        if iter_num == start_iter + 1:
            log(f"first training iteration done {time.time() - t_start:.1f} s after the start of training "
                f"(compilation included)")

        if log_now and rank == 0:
            dt = (time.time() - t_last) / iters_timed  # seconds per iteration since the last line
            mfu = estimate_mfu(raw_model, c['batch_size'] * ga, dt, peak) if peak > 0 else None
            if mfu is not None and mfu > 1.0:
                # faster than the peak: peak_flops was set too low; the fastest rate seen is the better estimate of
                # the peak, so MFU never passes 100%
                log(f"train.py: {mfu * peak / 1e12:.4g} TFLOP/s achieved, above the peak {peak / 1e12:.4g} TFLOP/s; "
                    f"using it as the peak from now on")
                peak, mfu = mfu * peak, 1.0
            gn = grad_norm.item()
            log(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms/iter, "
                f"{tokens_per_iter / dt:,.0f} tok/s" + (f", mfu {mfu * 100:.2f}%" if mfu is not None else "") +
                f", grad norm {gn:.3f}")
            loggers.scalars({'train/loss': lossf, 'train/lr': lr, 'train/grad_norm': gn,
                             'perf/ms_per_iter': dt * 1000, 'perf/tokens_per_s': tokens_per_iter / dt,
                             **({'perf/mfu': mfu} if mfu is not None else {})}, iter_num)
            t_last, iters_timed = time.time(), 0

    if ddp and not c['eval_only']:
        check_final_weights(raw_model, world_size, log)
    loggers.close()
    return best_val_loss


# -----------------------------------------------------------------------------------------------------
# what the run calls: its data and model, a batch, the learning rate, the EMA, an evaluation, a save

def read_meta(c):
    """meta.json first, so a missing or foreign directory fails before any model is built; vocab_size=0 becomes the
    data's, and ar, which reads its last id as <|endoftext|> (its BOS), must have it there."""
    if not os.path.isdir(c['data_dir']):
        fail(f"data_dir {c['data_dir']!r} does not exist; write it with prepare.py "
             f"(e.g. python prepare.py --input=... ) or set --dataset / --data_dir")
    try:
        meta = load_meta(c['data_dir'])
    except (OSError, ValueError, KeyError) as e:
        fail(f"data_dir {c['data_dir']!r}: {e}")
    if c['init_from'] == 'scratch':  # a resumed run takes the checkpoint's (checked against this data on loading)
        c['vocab_size'] = c['vocab_size'] or meta['vocab_size']
    if c['model_type'] == 'ar' and c['vocab_size'] and c['vocab_size'] - 1 != meta['eot_token']:
        fail(f"model_type='ar' with vocab_size={c['vocab_size']} reads id {c['vocab_size'] - 1} as <|endoftext|>, but "
             f"{c['data_dir']}/meta.json has eot_token={meta['eot_token']}: leave vocab_size=0 (the data's)")
    return meta


def build_or_resume(c, meta, ckpt_path):
    """A fresh model, or the checkpoint's (by the shared loader, checked by checkpoint.resume_checkpoint) with its
    model settings taken into c. Returns (model, model_args, ckpt or None)."""
    model_args = {f.name: c[f.name] for f in dataclasses.fields(ModelConfig)}
    if c['init_from'] == 'scratch':
        torch.manual_seed(c['seed'])  # identical initial weights on every rank (DDP also broadcasts rank 0's)
        try:
            return build_model(ModelConfig(**model_args)), model_args, None
        except (ValueError, TypeError) as e:
            fail(f"invalid model configuration: {e}")
    try:
        model, ckpt = resume_checkpoint(ckpt_path, c, meta, c['data_dir'])
    except ValueError as e:
        fail(str(e))
    c.update(ckpt['model_args'])
    return model, dict(ckpt['model_args']), ckpt


Data = collections.namedtuple('Data', 'train val vocab token_bytes unigram_nats unigram_bits unigram_bpb')


def open_data(c, meta, skip, log):
    """The train and val splits (prepare.TokenWindows, windows of block_size + skip tokens, checked against the
    vocabulary), what the ids mean (prepare.Vocab; and each id's bytes, for bits per byte, where the tokenizer's
    files are at hand), and the unigram line: a unigram model of the train split, scored on the very tokens the val
    loss predicts (ar, skip = 1, predicts all but a window's first token), so a curve that stays at this line has
    learned no context. Counting reads every train id once, so it also checks them all against the vocabulary; the
    val ids are checked too, so a corrupt split stops the run now rather than at some evaluation. The line is in nats
    per token of the data's ids (the unit of the val loss), bits per GPT-2 token and bits per byte (None without the
    tokenizer), the units of val_bits (prepare.Vocab)."""
    window = c['block_size'] + skip
    try:
        train_data, val_data = (TokenWindows(c['data_dir'], split, window, vocab_size=c['vocab_size'])
                                for split in ('train', 'val'))
    except (OSError, ValueError, KeyError) as e:
        fail(f"data_dir {c['data_dir']!r} does not fit the model (block_size={c['block_size']}, "
             f"window={window}, vocab_size={c['vocab_size']}): {e}")
    vocab = Vocab(meta)
    try:
        token_bytes = torch.from_numpy(vocab.token_bytes(meta['splits'].get('val')))
    except PrepareError as e:
        token_bytes = None
        log(f"train.py: no bits per byte: {e}")
    try:
        unigram = torch.from_numpy(unigram_logprobs(c['data_dir'], 'train', c['vocab_size']))
        check_ids(c['data_dir'], 'val')
    except ValueError as e:
        fail(str(e))
    x = torch.cat([get_batch(val_data, c, k, _EVAL_SEED, 0)[:, skip:].cpu() for k in range(c['eval_iters'])])
    nats = -unigram[x]
    bits = nats / math.log(2) + vocab.gpt2_bits(x)
    per_byte = bits.sum().item() / token_bytes[x].sum().item() if token_bytes is not None else None
    return Data(train_data, val_data, vocab, token_bytes, nats.mean().item(), bits.mean().item(), per_byte)


def get_batch(loader, c, step, seed, rank):
    """A batch of windows on the device; the reader checks every batch's ids against the vocabulary."""
    try:
        x = loader.random_batch(c['batch_size'], step=step, seed=seed, rank=rank)
    except ValueError as e:
        fail(str(e))
    if c['device'].startswith('cuda'):
        return x.pin_memory().to(c['device'], non_blocking=True)
    return x.to(c['device'])


def configure_optimizer(model, weight_decay, learning_rate, betas, device_type):
    """AdamW with weight decay on matrices only (not biases, gains or the tables in the family's `no_decay`)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.dim() >= 2 and n not in model.no_decay]
    other = [p for n, p in params if not (p.dim() >= 2 and n not in model.no_decay)]
    groups = [{'params': decay, 'weight_decay': weight_decay}, {'params': other, 'weight_decay': 0.0}]
    fused = {'fused': True} if device_type in ('cuda', 'cpu') else {}
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **fused)


def get_lr(it, c):
    """Linear warmup over warmup_iters; then 'cosine': cosine decay to min_lr at lr_decay_iters, then min_lr; or 'wsd'
    (warmup-stable-decay, Hagele et al. 2024): learning_rate until the cooldown's first step, max_iters -
    cooldown_iters, then linearly down to min_lr, lr(it) = min_lr + (lr - min_lr) (max_iters - it) / cooldown_iters."""
    if not c['decay_lr']:
        return c['learning_rate']
    if it < c['warmup_iters']:
        return c['learning_rate'] * (it + 1) / (c['warmup_iters'] + 1)
    if c['lr_schedule'] == 'wsd':
        left = c['max_iters'] - it  # steps left, this one included
        if left >= c['cooldown_iters']:
            return c['learning_rate']
        return c['min_lr'] + (c['learning_rate'] - c['min_lr']) * left / c['cooldown_iters']
    if it >= c['lr_decay_iters']:
        return c['min_lr']
    ratio = (it - c['warmup_iters']) / (c['lr_decay_iters'] - c['warmup_iters'])
    return c['min_lr'] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (c['learning_rate'] - c['min_lr'])


def update_ema(ema, model, ema_decay, iter_num):
    """EMA of the weights, with a warmup of the decay so that short runs get a useful average too; buffers (the
    bound's time-proposal statistics) are copied."""
    d = min(ema_decay, (1 + iter_num) / (10 + iter_num))
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - d)
        for e, b in zip(ema.buffers(), model.buffers()):
            e.copy_(b)


@contextmanager
def buffers_kept(*modules):
    """Put every buffer of the modules (None skipped) back as it was on leaving: for an evaluation, whose forward
    passes would otherwise update running statistics (the bound's time proposal), so that it changes no state and
    evaluating a saved checkpoint again reproduces its figures."""
    saved = [(b, b.clone()) for m in modules if m is not None for b in m.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, copy_ in saved:
                b.copy_(copy_)


@torch.no_grad()
def estimate_loss(c, data, eval_model, raw_model, ema, ctx, rank, world_size, ddp):
    """Train and val losses (and the EMA's), and val bits/token by the family's bound (exact for ar), with the
    weights sampling would use. The same windows and the same noise every time, so successive numbers are
    comparable; the eval batches are shared out over the ranks and the sums all-reduced."""
    device, out = c['device'], {}
    jobs = [('train', data.train, eval_model), ('val', data.val, eval_model)]
    if ema is not None:
        jobs.append(('val_ema', data.val, ema))
    for name, loader, m in jobs:
        m.eval()
        total = torch.zeros((), dtype=torch.float64, device=device)
        for k in range(rank, c['eval_iters'], world_size):
            X = get_batch(loader, c, k, _EVAL_SEED, 0)
            torch.manual_seed(stream_seed(_EVAL_SEED, k))
            with ctx:
                total += m(X).double()
        if ddp:
            dist.all_reduce(total)
        out[name] = total.item() / c['eval_iters']
    if c['eval_bound']:
        # one draw of the bound per window (more where there are under _MIN_BOUND_DRAWS windows); the windows'
        # spread gives the standard error, because the per-window bound is right-skewed and a mean of a few dozen
        # single draws can sit well below the test-split figure. Bits per GPT-2 token (a compact vocabulary's
        # <|unk|> charged its share of the unseen ids, prepare.Vocab)
        m, skip = (ema if ema is not None else raw_model), raw_model.extra_tokens
        draws = 1 if m.exact_likelihood else -(-_MIN_BOUND_DRAWS // (c['eval_iters'] * c['batch_size']))
        sums = torch.zeros(5, dtype=torch.float64, device=device)  # windows, sum, sum of squares, bits, bytes
        for k in range(rank, c['eval_iters'], world_size):
            gen = torch.Generator(device=device).manual_seed(stream_seed(_EVAL_SEED, 1, k))
            X = get_batch(data.val, c, k, _EVAL_SEED, 0)
            bits = sum(m.position_nll(X, generator=gen).double() for _ in range(draws)) / draws
            bits = bits + data.vocab.gpt2_bits(X[:, skip:])
            nbytes = data.token_bytes.to(device)[X[:, skip:]].sum() if data.token_bytes is not None else 0.0
            window = bits.mean(1)
            sums += torch.stack([torch.tensor(float(window.numel()), dtype=torch.float64, device=device),
                                 window.sum(), window.square().sum(), bits.sum(),
                                 torch.as_tensor(nbytes, dtype=torch.float64, device=device)])
        if ddp:
            dist.all_reduce(sums)
        n, mean = sums[0].item(), (sums[1] / sums[0]).item()
        var = max(sums[2].item() / n - mean * mean, 0.0) * n / max(n - 1, 1)  # unbiased sample variance
        out['val_bits'], out['val_bits_se'] = mean, math.sqrt(var / n)
        if data.token_bytes is not None:
            out['val_bits_per_byte'] = (sums[3] / sums[4]).item()
    return out


def eval_line(it, losses, data):
    """An evaluation's console line: the losses, and the bound beside the unigram line, ± its standard error."""
    ema_part = f", val (EMA) {losses['val_ema']:.4f}" if 'val_ema' in losses else ""
    bpb = f", {losses['val_bits_per_byte']:.3f} bits/byte (unigram {data.unigram_bpb:.3f})" \
        if 'val_bits_per_byte' in losses else ""
    bits_part = f", val {losses['val_bits']:.3f} ± {losses['val_bits_se']:.3f} bits/token (unigram " \
        f"{data.unigram_bits:.3f}){bpb}" if 'val_bits' in losses else ""
    return f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}{ema_part}{bits_part}"


def kept(ckpt_path, last_saved):
    """What is on disk when a run stops without saving, for its last line."""
    where = f"iteration {last_saved}" if last_saved is not None else "none written yet"
    return f"{ckpt_path} is left as it was (last checkpoint: {where})"


def save(ckpt_path, ckpt, model, ema, last_saved):
    """ckpt to ckpt_path, atomically: a failed save leaves the previous checkpoint as it was, and weights that are not
    all finite (a diverged run: model's or the EMA's) are never saved over it."""
    for m in (model, ema):
        bad = next((n for n, p in (m.named_parameters() if m is not None else []) if not p.isfinite().all()), None)
        if bad:
            fail(f"non-finite weights ({bad}{' of the EMA' if m is ema else ''}) at iteration {ckpt['iter_num']}; "
                 f"stopping without saving. {kept(ckpt_path, last_saved)}")
    try:
        save_checkpoint(ckpt_path, ckpt)
    except (OSError, RuntimeError) as e:  # torch reports a full disk as RuntimeError('... unexpected pos ...')
        fail(f"cannot write {ckpt_path} at iteration {ckpt['iter_num']}: {one_line(e)}: is the disk full? The previous "
             f"checkpoint, if any, is left as it was")


if __name__ == '__main__':
    line_buffered_stdout()
    run_script(main, 'train.py', torchrun=launched_by_torchrun())
