"""
train.py's guard rails, kept out of the way of its run: its settings checked (and the derived ones filled in)
before anything is built, and the data against them; DDP's process group, set up and torn down, with the checks that the ranks draw
different windows and end with bitwise identical weights; and the stop at a signal, which saves the current
iteration first. Each failure is one line, `train.py: ...` (util.fail).
"""

import functools
import hashlib
import math
import os
import sys
from contextlib import contextmanager

import torch
import torch.distributed as dist

import util
from prepare import TokenWindows, load_meta
from util import resolve_device

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
    for key in ('beta1', 'beta2'):
        if not 0.0 <= c[key] < 1.0:
            fail(f"{key}={c[key]}, expected in [0, 1) (AdamW's moment decay)")
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


# -----------------------------------------------------------------------------------------------------
# the data, checked against the settings before the model is built

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


def open_windows(c, window):
    """The train and val splits' readers (prepare.TokenWindows), which check them against the vocabulary."""
    try:
        return (TokenWindows(c['data_dir'], 'train', window, vocab_size=c['vocab_size']),
                TokenWindows(c['data_dir'], 'val', window, vocab_size=c['vocab_size']))
    except (OSError, ValueError, KeyError) as e:
        fail(f"data_dir {c['data_dir']!r} does not fit the model (block_size={c['block_size']}, "
             f"window={window}, vocab_size={c['vocab_size']}): {e}")


# -----------------------------------------------------------------------------------------------------
# DDP: the processes, and the checks that they agree where they must and differ where they must

def launched_by_torchrun():
    return 'RANK' in os.environ and 'WORLD_SIZE' in os.environ


@contextmanager
def ddp_processes(c, ddp, device_type):
    """DDP's process group while the run is inside (nothing without ddp); each rank on its own GPU (c['device']
    becomes cuda:LOCAL_RANK). On leaving, the process group is destroyed; after a run that ended normally, first a
    barrier: no rank tears down its gloo/NCCL connections while another still talks on them (util.run_script's
    exit covers the other teardown race: gloo's workers against Python's)."""
    if not ddp:
        yield
        return
    if device_type == 'cuda':
        c['device'] = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(c['device'])
    dist.init_process_group(backend=c['backend'] if c['backend'] != 'auto' else
                            ('nccl' if device_type == 'cuda' else 'gloo'))
    try:
        yield
        dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def fingerprint(tensors):
    """Short hash of the exact bytes of some tensors: equal iff bitwise equal (used to compare DDP ranks)."""
    h = hashlib.sha1()
    for t in tensors:
        h.update(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def check_ddp_ranks(world_size, log, what, tensors, expect_distinct):
    """DDP safety checks: every rank draws its own windows (distinct fingerprints) and ends with bitwise
    identical weights (one fingerprint)."""
    prints = [None] * world_size
    dist.all_gather_object(prints, fingerprint(tensors))
    ok = len(set(prints)) == (world_size if expect_distinct else 1)
    log(f"ddp: {what} fingerprints {prints}" + ("" if expect_distinct else
                                                 (" (identical on all ranks)" if ok else " DIFFER")))
    if not ok:
        fail("DDP ranks drew identical training windows; TokenWindows.random_batch must depend on rank"
             if expect_distinct else "DDP ranks ended with different weights")



def check_final_weights(model, world_size, log):
    """After training under DDP: buffers that each rank's own forward updates (the bound's time-proposal statistics)
    follow rank 0's, as DDP's broadcast at every forward already makes them; then every rank must hold identical
    weights."""
    for buf in model.buffers():
        dist.broadcast(buf, 0)
    check_ddp_ranks(world_size, log, "final weight", model.state_dict().values(), expect_distinct=False)

# -----------------------------------------------------------------------------------------------------
# a stop at SIGINT / SIGTERM (util.GracefulStop records the signal; the training loop calls this where it is safe)

def kept(run):
    """What is on disk when a run stops without saving, for its last line."""
    where = f"iteration {run.last_saved}" if run.last_saved is not None else "none written yet"
    return f"{run.ckpt_path} is left as it was (last checkpoint: {where})"


def stop_and_save(run, stop, resume_cmd, save):
    """Stop at this step boundary: rank 0 saves the current iteration (save(run, iter_num), atomically; a second
    signal during the save abandons it, leaving the previous checkpoint) and says where it stopped and how to
    resume; every rank leaves with 128 + the signal's number, as a process killed by it would."""
    it, name = run.iter_num, util.GracefulStop.name(stop.signum)
    if run.rank == 0:
        try:
            if run.last_saved != it:
                save(run, it)
        except util.StopNow as e:
            fail(f"a second {util.GracefulStop.name(e.signum)} during the save at iteration {it}: stopped without "
                 f"it; {kept(run)}")
        print(f"train.py: {name}: stopped at iteration {it}, saved in {run.ckpt_path}; resume with: {resume_cmd}",
              file=sys.stderr)
    if run.ddp:
        dist.barrier()  # the other ranks wait for rank 0's save, then all leave together
    raise SystemExit(128 + stop.signum)
