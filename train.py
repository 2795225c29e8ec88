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
In the order a run goes: settings, main(), setup, the training loop, evaluation, saving. Guard rails are in guards.py
(settings, data, DDP, signals) and checkpoint.py (out_dir, resume); TensorBoard/wandb/ClearML in loggers.py.
"""

import copy
import dataclasses
import functools
import math
import os
import time
import types

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import guards
import util
from checkpoint import claim_out_dir, restore_training, resume_checkpoint, save_checkpoint
from configurator import configure
from loggers import Loggers
from model import ModelConfig, build_model
from prepare import PrepareError, Vocab, check_ids, one_line, unigram_logprobs
from util import autocast_context, keep_freed_memory, line_buffered_stdout, stream_seed

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
continuous_time = False         # embed/analog/bits: real t in [0, T], the bound an integral (continuous_time.py);
                                # T then sets the decoder's time t = 1, the bound's cells and the default steps
noise_schedule = 'sqrt'         # linear | cosine | sqrt (Diffusion-LM's; bits configs use cosine)
predict = 'x0'                  # embed/analog: the network predicts eps or x0
embed_dim = 64                  # embed: width of the diffused token embedding (projected to n_embd)
self_cond = True                # embed/analog: feed the previous estimate of x0 back (self-conditioning)
cfg_drop = 0.0                  # embed: >0 trains a prompt-condition channel, dropped with this rate (CFG)
analog_scale = 1.0              # analog: bits are mapped to -scale / +scale
mask_schedule = 'loglinear'     # mask: alpha_t = 1 - t (loglinear) or cos(pi t / 2) (cosine)
time_cond = False               # mask: condition the network on t (MDLM's default is off)
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
fail = functools.partial(util.fail, 'train.py')


def main(argv=None):
    ddp = guards.launched_by_torchrun()
    rank = int(os.environ.get('RANK', 0)) if ddp else 0
    world_size = int(os.environ['WORLD_SIZE']) if ddp else 1
    # a copy of the defaults, so main() can run twice in one process (tests) with different arguments
    c = configure({k: globals()[k] for k in _config_keys}, argv, keys=_config_keys, verbose=rank == 0,
                  prog='train.py')
    device_type = guards.check_config(c, rank, world_size)
    if device_type == 'cpu':
        keep_freed_memory()  # large tensors are reused instead of re-mapped at every step (see util.py)
    release = claim_out_dir(c['out_dir'], replace_ok=c['init_from'] == 'resume' or c['overwrite'],
                            writer=rank == 0 and not c['eval_only'])
    try:
        # processes: DDP when launched by torchrun; every rank trains on its own windows, rank 0 logs and writes
        with guards.ddp_processes(c, ddp, device_type), util.GracefulStop(enabled=not c['eval_only']) as stop:
            run = setup(c, ddp, rank, world_size, device_type)
            return train(run, stop, util.resume_command(argv, world_size))
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
            raise
        fail(f"out of memory ({one_line(e)[:120]}): lower batch_size (and raise gradient_accumulation_steps to keep "
             f"the tokens per step) or block_size; {os.path.join(c['out_dir'], 'ckpt.pt')} is left as it was")
    except util.StopNow as e:  # a second signal before the run could say more (in train(), it does)
        fail(f"a second {util.GracefulStop.name(e.signum)}: stopped at once; {os.path.join(c['out_dir'], 'ckpt.pt')} "
             f"is left as it was")
    finally:
        if release is not None:
            release()


# -----------------------------------------------------------------------------------------------------
# setup: data, model, optimizer, logs

def setup(c, ddp, rank, world_size, device_type):
    """Data, model, optimizer, loss scaler, EMA, compile, DDP and the loggers, gathered in one namespace `run`."""
    log = print if rank == 0 else (lambda *a, **k: None)
    if c['max_iters'] == 0 and not c['eval_only']:
        log("train.py: max_iters=0: no training steps; the initial weights are evaluated and saved as iteration 0")
    run = types.SimpleNamespace(c=c, ddp=ddp, rank=rank, world_size=world_size, device_type=device_type, log=log,
                                device=c['device'], ctx=autocast_context(device_type, c['dtype']),
                                ga_steps=c['gradient_accumulation_steps'] // world_size,  # micro-batches per rank
                                ckpt_path=os.path.join(c['out_dir'], 'ckpt.pt'),
                                iter_num=0, best_val_loss=float('inf'), last_saved=None, train_seconds=0.0)
    run.meta = guards.read_meta(c)  # and vocab_size=0 becomes the data's
    model, run.model_args, ckpt = build_or_resume(c, run.meta, run.ckpt_path)
    run.raw_model = model.to(run.device)
    run.window = c['block_size'] + model.extra_tokens
    run.tokens_per_iter = c['batch_size'] * c['block_size'] * run.ga_steps * world_size
    run.train_data, run.val_data = guards.open_windows(c, run.window)
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
        restore_training(ckpt, run.optimizer, run.scaler, run.ema, c, log)
        run.iter_num, run.best_val_loss = ckpt['iter_num'], ckpt['best_val_loss']
        run.train_seconds, run.last_saved = ckpt.get('train_seconds', 0.0), ckpt['iter_num']
        del ckpt  # free the host copy of the weights and optimizer state
    if c['compile']:
        log("compiling the model with torch.compile ...")
        model = torch.compile(model, mode=c['compile_mode'])
    run.eval_model = model  # (compiled if asked) without the DDP wrapper: evaluation needs no gradient sync
    if ddp:
        model = DDP(model, device_ids=[int(run.device.split(':')[1])] if device_type == 'cuda' else None)
    run.model = model
    describe(run)
    run.peak = c['peak_flops']  # FLOP/s of one device, for MFU
    writes = rank == 0 and not c['eval_only']
    if writes:
        log(f"MFU against peak_flops={run.peak / 1e12:.4g} TFLOP/s, as given" if run.peak else
            "no MFU: set peak_flops to the peak FLOP/s of one device (bench.py measures it on an idle machine)")
    run.loggers = Loggers(c, run.iter_num, enabled=writes)  # (and eval_log.jsonl, restarted at iter_num)
    return run


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


def get_batch(run, loader, step, seed, r):
    """A batch of windows on the device; the reader checks every batch's ids against the vocabulary."""
    try:
        x = loader.random_batch(run.c['batch_size'], step=step, seed=seed, rank=r)
    except ValueError as e:
        fail(str(e))
    if run.device_type == 'cuda':
        return x.pin_memory().to(run.device, non_blocking=True)
    return x.to(run.device)


def describe(run):
    c, log = run.c, run.log
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


# -----------------------------------------------------------------------------------------------------
# the training loop

def train(run, stop=None, resume_cmd=''):
    """Evaluate, stop on a signal, take an optimizer step, log: until max_iters. Returns the best val loss."""
    c, log = run.c, run.log
    stop = stop or util.GracefulStop(enabled=False)
    if run.ddp:
        first = get_batch(run, run.train_data, run.iter_num * run.ga_steps, c['seed'], run.rank)
        guards.check_ddp_ranks(run.world_size, log, f"{run.world_size} ranks, first micro-batch", [first],
                               expect_distinct=True)
    start_iter = run.iter_num
    run.model.train()
    t_last, iters_timed, t_start = time.time(), 0, time.time()
    while True:
        # evaluate at every eval_interval and at the end; a resumed run already evaluated its first iteration
        it = run.iter_num
        resumed_here = c['init_from'] == 'resume' and it == start_iter
        if c['eval_only'] or ((it % c['eval_interval'] == 0 or it == c['max_iters']) and not resumed_here):
            evaluate(run)
            t_last, iters_timed = time.time(), 0  # evaluation time is not training time
        if c['eval_only'] or it >= c['max_iters']:
            break
        # DDP ranks vote every log_interval steps, where the loop reads the loss anyway (a host sync)
        if stop.requested(run.ddp, it % c['log_interval'] == 0, run.device):
            run.loggers.close()
            guards.stop_and_save(run, stop, resume_cmd, save)

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
        if log_now and run.rank == 0:
            log_iteration(run, lossf, grad_norm, lr, (time.time() - t_last) / iters_timed)
            t_last, iters_timed = time.time(), 0

    if run.ddp and not c['eval_only']:
        guards.check_final_weights(run.raw_model, run.world_size, log)
    run.loggers.close()
    return run.best_val_loss


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
            every = f" (checked every {c['log_interval']} iterations)" if c['log_interval'] > 1 else ""
            fail(f"non-finite loss ({lossf}) at iteration {run.iter_num}{every}; stopping. {guards.kept(run)}")
    run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(),
                                               c['grad_clip'] if c['grad_clip'] > 0 else float('inf'))
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        update_ema(run.ema, run.raw_model, c['ema_decay'], run.iter_num)
    return lossf, grad_norm


def update_ema(ema, model, ema_decay, iter_num):
    """EMA of the weights, with a warmup of the decay so that short runs get a useful average too; buffers (the
    bound's time-proposal statistics) are copied."""
    d = min(ema_decay, (1 + iter_num) / (10 + iter_num))
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - d)
        for e, b in zip(ema.buffers(), model.buffers()):
            e.copy_(b)


def log_iteration(run, lossf, grad_norm, lr, dt):
    """One training log line and its scalars (dt: seconds per iteration); MFU against run.peak."""
    c, peak = run.c, run.peak
    mfu = util.estimate_mfu(run.raw_model, c['batch_size'] * run.ga_steps, dt, peak) if peak > 0 else None
    if mfu is not None and mfu > 1.0:
        # faster than the peak: peak_flops was set too low; the fastest rate seen is the better estimate of the
        # peak, so MFU never passes 100%
        run.log(f"train.py: {mfu * peak / 1e12:.4g} TFLOP/s achieved, above the peak {peak / 1e12:.4g} TFLOP/s; "
                f"using it as the peak from now on")
        run.peak, mfu = mfu * peak, 1.0
    gn = grad_norm.item()
    run.log(f"iter {run.iter_num}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms/iter, "
            f"{run.tokens_per_iter / dt:,.0f} tok/s" + (f", mfu {mfu * 100:.2f}%" if mfu is not None else "") +
            f", grad norm {gn:.3f}")
    run.loggers.scalars({'train/loss': lossf, 'train/lr': lr, 'train/grad_norm': gn, 'perf/ms_per_iter': dt * 1000,
                         'perf/tokens_per_s': run.tokens_per_iter / dt,
                         **({'perf/mfu': mfu} if mfu is not None else {})}, run.iter_num)


# -----------------------------------------------------------------------------------------------------
# evaluation

def evaluate(run):
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
    run.log(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}{ema_part}{bits_part}")
    bad = [k for k, v in losses.items() if not math.isfinite(v)]
    if bad:  # a diverged model: nothing of it is logged or saved over the last good checkpoint
        fail(f"non-finite {bad[0]} loss ({losses[bad[0]]}) at the evaluation of iteration {it}; stopping. "
             f"{guards.kept(run)}")
    if c['eval_only']:
        return
    run.loggers.evaluation(it, losses, tokens=it * run.tokens_per_iter, train_seconds=run.train_seconds,
                           unigram_bits=run.unigram_bits, unigram_bits_per_byte=run.unigram_bpb,
                           model_type=c['model_type'])
    # the checkpoint is judged by the weights that sampling will use: the EMA's, when there is one
    score = losses.get('val_ema', losses['val'])
    if (it > 0 or c['max_iters'] == 0) and (score < run.best_val_loss or c['always_save_checkpoint']):
        run.best_val_loss = min(run.best_val_loss, score)
        if run.rank == 0:
            save(run, it)
            run.log(f"saved {run.ckpt_path} (iteration {it})")
        run.last_saved = it


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
        if run.ddp:
            dist.all_reduce(total)
        out[name] = total.item() / c['eval_iters']
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


# -----------------------------------------------------------------------------------------------------
# saving

def save(run, iter_num):
    """out_dir/ckpt.pt, atomically: a failed save leaves the previous checkpoint as it was, and weights that are not
    all finite (a diverged run) are never saved over it."""
    for m in (run.raw_model, run.ema):
        bad = next((n for n, p in (m.named_parameters() if m is not None else []) if not p.isfinite().all()), None)
        if bad:
            fail(f"non-finite weights ({bad}{' of the EMA' if m is run.ema else ''}) at iteration {iter_num}; "
                 f"stopping without saving. {guards.kept(run)}")
    ckpt = {'model_args': run.model_args, 'model': run.raw_model.state_dict(),
            'ema': run.ema.state_dict() if run.ema is not None else None,
            'optimizer': run.optimizer.state_dict(), 'scaler': run.scaler.state_dict(),
            'iter_num': iter_num, 'best_val_loss': run.best_val_loss, 'train_seconds': run.train_seconds,
            'config': dict(run.c), 'meta': run.meta}
    try:
        save_checkpoint(run.ckpt_path, ckpt)
    except (OSError, RuntimeError) as e:  # torch reports a full disk as RuntimeError('... unexpected pos ...')
        fail(f"cannot write {run.ckpt_path} at iteration {iter_num}: {one_line(e)}: is the disk full? The previous "
             f"checkpoint, if any, is left as it was")


if __name__ == '__main__':
    line_buffered_stdout()
    util.run_script(main, 'train.py', torchrun=guards.launched_by_torchrun())
