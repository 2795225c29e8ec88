"""
What every script needs from the machine and the process it runs in: the device and precision that the 'auto'
settings resolve to, autocast, a model's method run in eval mode (a bound's also in full precision), synchronisation
and malloc's settings on the CPU; the machine's matmul peak and a model's share of it (MFU); DDP's process group,
with the checks that the ranks draw different windows and end with identical weights; a stop at the next step
boundary on SIGINT / SIGTERM; and a script's end in one line, also under torchrun.
"""

import ctypes
import ctypes.util
import functools
import hashlib
import json
import os
import shlex
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist


def fail(prog, msg):
    """End a script with one line, `prog: msg`, and no traceback (each script binds its name: fail(msg))."""
    raise SystemExit(f"{prog}: {msg}")


def line_buffered_stdout():
    """Flush stdout and stderr at every newline, also when they go to a file or a pipe (Python buffers them in
    blocks there), so a log redirected with `> run.log` keeps up with the run instead of lagging by kilobytes."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, 'reconfigure'):
            stream.reconfigure(line_buffering=True)


# -----------------------------------------------------------------------------------------------------
# the device: where and in what precision the network runs

def resolve_device(device, dtype, prog='train.py'):
    """Concrete (device, device_type, dtype) for the 'auto' settings, with checks; shared by the scripts.

    device 'auto': cuda if available, else cpu. dtype 'auto': on CUDA bf16 where the GPU has it (no loss
    scaling needed), else fp16 (train.py adds a GradScaler); on CPU fp32, since bf16 autocast is available
    on request but on CPUs it often saves little or nothing (it was slower than fp32 on the 2-core dev box).
    """
    if dtype not in ('auto', 'float32', 'bfloat16', 'float16'):
        raise SystemExit(f"{prog}: dtype={dtype!r}, expected 'auto', 'float32', 'bfloat16' or 'float16'")
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        device_type = torch.device(device).type
    except (RuntimeError, TypeError):
        device_type = None
    if device_type not in ('cpu', 'cuda', 'mps'):
        raise SystemExit(f"{prog}: device={device!r}, expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    if device_type == 'mps' and not torch.backends.mps.is_available():
        raise SystemExit(f"{prog}: device={device!r} but torch.backends.mps.is_available() is False; use --device=cpu")
    if device_type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit(f"{prog}: device={device!r} but torch.cuda.is_available() is False; use --device=cpu")
    if dtype == 'auto':
        dtype = ('bfloat16' if torch.cuda.is_bf16_supported() else 'float16') if device_type == 'cuda' else 'float32'
    if dtype == 'float16' and device_type != 'cuda':
        raise SystemExit(f"{prog}: dtype='float16' needs CUDA (loss scaling); on {device_type} use bfloat16 or float32")
    return device, device_type, dtype


def autocast_context(device_type, dtype):
    """What the network runs under: nothing for float32, else autocast to dtype. On CUDA, float32 matmuls use
    TF32 (~8x faster, ample for training and sampling)."""
    if device_type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))


def in_eval_mode(method, full_precision=False):
    """Run a method with the module in eval mode (no dropout), restoring the previous mode afterwards; with
    full_precision (position_nll) also without gradients or autocast: the Gaussian bounds multiply every error in the
    x0 estimate by SNR/2 (~1e4 near t = 1), so bf16 rounding alone would add bits per token."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        was_training = self.training
        self.eval()
        try:
            if not full_precision:
                return method(self, *args, **kwargs)
            with torch.no_grad(), torch.autocast(args[0].device.type, enabled=False):  # args[0]: the ids scored
                return method(self, *args, **kwargs)
        finally:
            self.train(was_training)
    return wrapper


eval_in_full_precision = functools.partial(in_eval_mode, full_precision=True)  # model.py: each position_nll()


def sync(device):
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the kernel.

    By default an allocation above a threshold (at most 32 MB) gets pages of its own from mmap and returns them on
    free; the vocabulary-sized tensors of a step (8 x 64 x 50,257 float32 logits: 100 MB, several per step) are
    then mapped, zero-filled by the kernel page by page, and unmapped again at every step. On the 2-core
    development machine that was 40% of all CPU time spent in the kernel, and a CPU training step of the 4 x 128
    models ran 1.5-1.6x faster with it off (median step of mask: 4.5-4.8 s -> 2.7-3.1 s under load). A no-op
    where the C library is not glibc. Returns True if the settings were applied."""
    if not sys.platform.startswith('linux'):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2 ** 30))
    except (OSError, AttributeError):
        return False


# -----------------------------------------------------------------------------------------------------
# the machine's speed: its matmul peak, and a model's FLOPs for MFU against it

def measure_peak_flops(device, dtype, seconds=0.5):
    """Achievable dense-matmul FLOP/s of one device in `dtype` (a torch.dtype or its name), by timing square
    matmuls for about `seconds`. MFU against this is the fraction of what this machine really does in the
    best case, not of a datasheet number (which a CPU or a throttled GPU never reaches)."""
    device = torch.device(device)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    n = 8192 if device.type == 'cuda' else 1024  # big enough to be compute bound, small enough to be quick
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(3):  # warm up kernels / thread pools
        a @ b
    sync(device)
    done, t0 = 0, time.perf_counter()
    while True:
        for _ in range(4):
            a @ b
        done += 4
        sync(device)
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return 2 * n ** 3 * done / elapsed


def flops_per_token(model):
    """6N for the matmuls (forward + backward) plus 12 L d T for attention scores and values. The conditioning path
    (time MLP, adaLN modulations) runs once per sequence, so it counts 1/block_size."""
    cfg = model.config
    per_seq = sum(p.numel() for n, p in model.named_parameters() if 't_embedder' in n or 'modulation' in n)
    per_tok = model.get_num_params() - per_seq
    return 6 * per_tok + 6 * per_seq / cfg.block_size + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


def estimate_mfu(model, fwdbwd_per_iter, dt, peak_flops):
    """Model FLOPs utilisation: achieved FLOP/s over `peak_flops` (measured for the device, passed in)."""
    return flops_per_token(model) * fwdbwd_per_iter * model.config.block_size / dt / peak_flops


# -----------------------------------------------------------------------------------------------------
# DDP: the processes, and the checks that they differ where they must and agree where they must

def launched_by_torchrun():
    return 'RANK' in os.environ and 'WORLD_SIZE' in os.environ


@contextmanager
def ddp_processes(c, ddp, device_type):
    """DDP's process group while the run is inside (nothing without ddp); each rank on its own GPU (c['device']
    becomes cuda:LOCAL_RANK). On leaving, the process group is destroyed; after a run that ended normally, first a
    barrier: no rank tears down its gloo/NCCL connections while another still talks on them (run_script's
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
        fail('train.py', "DDP ranks drew identical training windows; TokenWindows.random_batch must depend on rank"
             if expect_distinct else "DDP ranks ended with different weights")


def check_final_weights(model, world_size, log):
    """After training under DDP: buffers that each rank's own forward updates (the bound's time-proposal statistics)
    follow rank 0's, as DDP's broadcast at every forward already makes them; then every rank must hold identical
    weights."""
    for buf in model.buffers():
        dist.broadcast(buf, 0)
    check_ddp_ranks(world_size, log, "final weight", model.state_dict().values(), expect_distinct=False)


# -----------------------------------------------------------------------------------------------------
# a clean stop on SIGINT / SIGTERM (and the command that resumes it), and a script's exit (also under torchrun)

class StopNow(BaseException):
    """A second SIGINT / SIGTERM: stop at once. Raised wherever the program is, a save included (write_atomic then
    removes its temp file, so the previous file is left as it was). A BaseException, so no `except Exception`
    swallows it."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


class GracefulStop:
    """SIGINT (Ctrl-C) and SIGTERM (what schedulers and torchrun send) ask a long loop to stop at its next step
    boundary: the handler only records the signal (`signum`), and the loop checks it where it is safe to save and
    leave, never from inside the handler. A second signal raises StopNow, so one who insists is not kept waiting.
    A context manager that installs the handlers (in the main thread, when enabled) and puts the old ones back."""

    def __init__(self, enabled=True):
        self.signum, self.enabled, self._old = None, enabled, {}

    def __enter__(self):
        if self.enabled and threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise StopNow(signum)
        self.signum = signum

    def requested(self, ddp=False, vote=False, device='cpu'):
        """Whether to stop now. Under DDP ranks may get their signals at different steps, so they stop only where
        they vote (every rank calls with vote=True at the same step): a max over the ranks, so all stop together,
        also one that got no signal itself."""
        if not ddp:
            return self.signum is not None
        if not vote:
            return False
        t = torch.tensor([self.signum or 0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        # decide by the reduced value alone: a signal that lands during the all_reduce sets this rank's signum only,
        # and reading it here would stop this rank while the others go on (it counts at the next vote instead)
        voted = int(t.item())
        if voted:
            self.signum = self.signum or voted
        return bool(voted)

    @staticmethod
    def name(signum):
        return signal.Signals(signum).name


def resume_command(argv, world_size, script='train.py'):
    """The command that continues a run from its checkpoint: its arguments (argv, or the command line's when None)
    with --init_from=resume, launched as it was (torchrun for several ranks)."""
    args = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith('--init_from=')]
    launcher = ['python'] if world_size == 1 else ['torchrun', '--standalone', f'--nproc_per_node={world_size}']
    return shlex.join([*launcher, sys.argv[0] if argv is None else script, *args, '--init_from=resume'])


def run_script(main, prog, torchrun=False):
    """Run a script's main() as its command. Alone, as Python does, but for Ctrl-C where no GracefulStop handles it:
    one line, `prog: interrupted`, and exit 130 (128 + SIGINT) instead of a traceback; every output is written to a
    temp file and renamed, so nothing is left half-written. Under torchrun: a one-line exit (SystemExit with
    a message) is printed by rank 0 and also written to the error file torchrun reads, so torchrun's failure summary
    shows that line (instead of 'To enable traceback see ...') for whichever rank failed; and every rank leaves
    without the interpreter's teardown, where gloo's worker threads can abort a finished process:

    Gloo's worker threads free each collective's work object some time after the collective completes, and that
    object holds a Python reference (its captured thread-local state): a worker that gets there after the
    interpreter began finalizing cannot take the GIL and aborts the process ('terminate called without an active
    exception', exit -6), though every step, checkpoint and log line was done (pytorch/pytorch#179291; ~1 run in 4
    on a loaded 2-core machine). When main() has returned or exited, the process group is destroyed and the
    checkpoint and logs are closed and renamed into place, so only the buffered streams need flushing."""
    try:
        if not torchrun:
            return main()
        main()
        code = 0
    except KeyboardInterrupt:
        if int(os.environ.get('RANK', 0)) == 0:
            print(f"{prog}: interrupted", file=sys.stderr)
        if not torchrun:
            raise SystemExit(130) from None
        code = 130
    except SystemExit as e:
        if not torchrun:
            raise
        code = e.code
        if isinstance(code, str):
            if int(os.environ.get('RANK', 0)) == 0:
                print(code, file=sys.stderr)
            if os.environ.get('TORCHELASTIC_ERROR_FILE'):
                try:
                    with open(os.environ['TORCHELASTIC_ERROR_FILE'], 'w') as f:
                        # torchrun's own format; its summary shows py_callstack, here the one line
                        json.dump({'message': {'message': code, 'extraInfo': {
                            'py_callstack': code, 'timestamp': str(int(time.time()))}}}, f)
                except OSError:
                    pass  # the line was printed; the summary then says less
            code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
