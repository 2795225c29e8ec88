"""
Helpers every script shares: device and precision resolution, the autocast context, eval mode for a method, the
matmul peak probe for MFU, device synchronisation, atomic file writes (checkpoints, samples, results and plots),
the checks that an output path is writable and replaces nothing it should not before the work starts, the out_dir
lock, line-buffered logs, the one-line exit of a script (also under torchrun), a clean stop on SIGINT / SIGTERM, and
the seeds of the random streams.
"""

import atexit
import ctypes
import ctypes.util
import functools
import json
import os
import shlex
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from contextlib import contextmanager, nullcontext

import numpy as np
import torch


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


def configure_optimizer(model, weight_decay, learning_rate, betas, device_type):
    """AdamW with weight decay on matrices only (not biases, gains or the tables in the family's `no_decay`)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.dim() >= 2 and n not in model.no_decay]
    other = [p for n, p in params if not (p.dim() >= 2 and n not in model.no_decay)]
    groups = [{'params': decay, 'weight_decay': weight_decay}, {'params': other, 'weight_decay': 0.0}]
    fused = {'fused': True} if device_type in ('cuda', 'cpu') else {}
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **fused)


def stream_seed(*parts):
    """A well-mixed 63-bit seed from integers, so (seed, rank, step) streams never collide or correlate."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0]) >> 1


def fail(prog, msg):
    """End a script with one line, `prog: msg`, and no traceback (each script binds its name: fail(msg))."""
    raise SystemExit(f"{prog}: {msg}")


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


def in_eval_mode(method):
    """Run a method with the module in eval mode (no dropout), restoring the previous mode afterwards."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        was_training = self.training
        self.eval()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.train(was_training)
    return wrapper


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
            for b, copy in saved:
                b.copy_(copy)


def sync(device):
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)


def write_atomic(path, write):
    """write(tmp_path) into a temp file beside `path`, then rename: readers never see a partial file, and a
    crash leaves the previous version intact. Used for checkpoints, samples, results and plots."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private (0600); give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def code_version(directory=os.path.dirname(os.path.abspath(__file__))):
    """`git describe --always --dirty` of the checkout holding this code (a commit, '-dirty' with uncommitted
    changes), or None where there is no git or no checkout: what a results file records as the code that made it."""
    try:
        p = subprocess.run(['git', '-C', directory, 'describe', '--always', '--dirty'], capture_output=True,
                           text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return (p.stdout.strip() or None) if p.returncode == 0 else None


def write_json(path, obj):
    """obj as indented JSON, written atomically (strict JSON: a NaN or inf is an error, not a silent token)."""
    def write(tmp):
        with open(tmp, 'w') as f:
            f.write(json.dumps(obj, indent=2, allow_nan=False, default=str) + '\n')
    write_atomic(path, write)


def save_figure(fig, path, title):
    """Finish a matplotlib figure (title, tight layout), write it as a PNG atomically, and free it."""
    import matplotlib.pyplot as plt
    fig.suptitle(title)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format='png', dpi=120))
    plt.close(fig)


def line_buffered_stdout():
    """Flush stdout and stderr at every newline, also when they go to a file or a pipe (Python buffers them in
    blocks there), so a log redirected with `> run.log` keeps up with the run instead of lagging by kilobytes."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, 'reconfigure'):
            stream.reconfigure(line_buffering=True)


def check_writable(path, what, prog, is_dir=False):
    """Exit with one line now, before any work, if `path` cannot be written: a directory (is_dir) where files
    will be created, or a file that write_atomic will write. Creates the (parent) directory, as writing would."""
    directory = path if is_dir else os.path.dirname(os.path.abspath(path))
    try:
        if not is_dir and os.path.isdir(path):
            raise IsADirectoryError(21, 'it is a directory')
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix='.write-check.', suffix='.tmp')
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise SystemExit(f"{prog}: cannot write {what}={path!r}: {e.strerror or e}; choose another path")


# -----------------------------------------------------------------------------------------------------
# outputs replace only what they wrote themselves
#
# The rule every script follows for a file the user names (or a directory it writes fixed names into):
#   - a path that does not exist is written;
#   - an existing file is replaced only when it is this script's own output for the same purpose, recognised by its
#     content (`ours`: e.g. sample.py's JSON lines of samples, a PNG tagged with what wrote it, a results.json with
#     the script's own keys), or when the user says so with --overwrite=True;
#   - a checkpoint (a torch.save file of any name, or *.pt / *.pth / *.ckpt), a token split (*.bin), a dataset's
#     meta.json or another script's output (OUTPUTS) is never replaced, not even with --overwrite=True: they are hours
#     of work, and not this script's to rewrite; nor is anything but a regular file (a symlink, a device, a FIFO):
#     renaming a file over it would replace the link or the node itself (as root, /dev/null), and a FIFO never ends.

def protected_kind(path):
    """What `path` is when it is a file no script may write over, else None."""
    mode = os.lstat(path).st_mode  # the path itself: never opened unless a regular file (a FIFO's open blocks)
    if stat.S_ISLNK(mode):
        return 'a symbolic link'
    if not stat.S_ISREG(mode):
        return 'a FIFO (named pipe)' if stat.S_ISFIFO(mode) else 'a socket' if stat.S_ISSOCK(mode) else 'a device file'
    name = os.path.basename(path)
    if name == 'meta.json':
        return "a dataset's meta.json"
    if name.endswith('.bin'):
        return 'a token split (.bin)'
    if name.endswith(('.pt', '.pth', '.ckpt')):
        return 'a checkpoint'
    try:
        with open(path, 'rb') as f:
            head = f.read(4)
        if head[:1] == b'\x80':  # a pickle (protocol 2 or later), as torch.save wrote long ago
            return 'a checkpoint'
        if head == b'PK\x03\x04':  # a zip archive: torch.save's format when it holds a data.pkl
            with zipfile.ZipFile(path) as z:
                if any(n == 'data.pkl' or n.endswith('/data.pkl') for n in z.namelist()):
                    return 'a checkpoint'
    except (OSError, zipfile.BadZipFile):
        pass  # unreadable or not a zip: not recognisably a checkpoint (check_writable reports what it must)
    return None


def json_with_keys(*keys, lines=False):
    """A recogniser for check_output: a JSON object holding `keys` (with lines, the first line of a JSON-lines
    file), the fingerprint of what one script writes for one purpose."""
    def ours(path):
        try:
            with open(path, encoding='utf-8') as f:
                obj = json.loads(f.readline() if lines else f.read())
        except (OSError, ValueError):
            return False
        return isinstance(obj, dict) and all(k in obj for k in keys)
    return ours


def png_tag(prog, what):
    """The tag a script writes into the PNGs it makes (their 'Software' text), so it knows them again."""
    return f"{prog} {what}"


def png_tagged(tag):
    """A recogniser for check_output: a PNG whose text chunks (before the image data) carry `tag`."""
    def ours(path):
        try:
            with open(path, 'rb') as f:
                head = f.read(1 << 16)
        except OSError:
            return False
        return head.startswith(b'\x89PNG') and tag.encode() in head
    return ours


# each script's own outputs, by their fingerprints (prog, what): what it rewrites freely, and what no other script
# writes over
OUTPUTS = {
    ('sample.py', 'out_file'): json_with_keys('sample', 'tokens', 'settings', lines=True),
    ('sample.py', 'trajectory_png'): png_tagged(png_tag('sample.py', 'trajectory_png')),
    ('evaluate.py', 'results.json'): json_with_keys('likelihood', 'rows', 'judge_name'),
    ('sweep.py', 'results.json'): json_with_keys('sweep', 'runs', 'samples'),
    ('curves.py', 'curves.json'): json_with_keys('config', 'curves'),
    ('probe.py', 'out_file'): json_with_keys('family', 'windows', 'unigram_nats', 'rows'),
    ('bench.py', 'json'): json_with_keys('config', 'device', 'peak_flops', 'train'),
}


def check_output(path, what, prog, overwrite=False, ours=None, label=None):
    """Exit with one line now, before any work, if writing the file `path` (the setting `what`) would replace a file
    it should not (the rule above; `ours(path)`, by default OUTPUTS[prog, what], says whether an existing file is
    this script's own `what`) or cannot be written (check_writable). `label` names the path in the message (default:
    what=path)."""
    label, ours = label or f"{what}={path!r}", ours or OUTPUTS.get((prog, what))
    if os.path.lexists(path) and not os.path.isdir(path):
        kind = protected_kind(path)
        if not kind and not (ours is not None and ours(path)):
            kind = next((f"{p}'s {w}" for (p, w), theirs in OUTPUTS.items() if theirs(path)), None)
        if kind:
            raise SystemExit(f"{prog}: {label} is {kind}; {prog} never writes over one, not even with "
                             f"--overwrite=True: choose another path")
        if not overwrite and not (ours is not None and ours(path)):
            raise SystemExit(f"{prog}: {label} exists and is not {prog}'s own {what}; choose another path, or "
                             f"replace it with --overwrite=True")
    check_writable(path, what, prog)


def check_distinct(prog, paths):
    """Exit with one line if two outputs of one run ({setting: path}, '' unset) are one file: the later would
    replace the earlier."""
    seen = {}
    for key, path in paths.items():
        if path:
            real = os.path.realpath(path)
            if real in seen:
                raise SystemExit(f"{prog}: {seen[real]} and {key} are the same file {path!r}: the one written later "
                                 f"would replace the other; give each its own path")
            seen[real] = key


def check_output_dir(directory, record, others, prog, overwrite=False, what='out_dir'):
    """check_output for a directory a script writes fixed names into: its `record` (e.g. results.json, recognised by
    OUTPUTS[prog, record]) and the `others` written with it (a table, a picture). Those are the script's own when
    the record is; any of them that exists beside no record of ours needs --overwrite=True."""
    check_writable(directory, what, prog, is_dir=True)
    mine = OUTPUTS[prog, record](os.path.join(directory, record))
    for name in (record, *others):
        path = os.path.join(directory, name)
        check_output(path, name, prog, overwrite, ours=lambda p: mine, label=f"{path!r} (in {what}={directory!r})")


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def lock_dir(directory, prog, created=False):
    """Take directory/run.lock for this process, so two runs never write one out_dir. The file holds the pid and
    host; another live run holding it is an error that names it. A lock left by a process of this host that no
    longer exists (kill -9) is taken over, with a message; one from another host cannot be checked and stops
    the run. Returns release(), also registered to run at exit (call it earlier when the run ends in-process); with
    `created` (the run made the directory) it also removes the directory if the run left nothing in it, so a run
    that fails before writing anything leaves no empty out_dir behind."""
    path = os.path.join(directory, 'run.lock')
    me = {'pid': os.getpid(), 'host': socket.gethostname()}
    os.makedirs(directory, exist_ok=True)
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            pass  # held: read who holds it below, and take it over only from a dead run on this host
        try:
            with open(path) as f:
                holder = json.load(f)
            pid, host = int(holder['pid']), str(holder['host'])
        except (OSError, ValueError, KeyError, TypeError):
            raise SystemExit(f"{prog}: out_dir {directory!r} is locked by {path}, which names no pid and host; "
                             f"if no run uses that out_dir, delete the file") from None
        if host != me['host'] or _pid_alive(pid):
            raise SystemExit(f"{prog}: out_dir {directory!r} is in use by pid {pid} on host {host} ({path}); "
                             f"wait for that run to end or use another out_dir (delete the file if that run is dead)")
        print(f"{prog}: taking over {path}: its pid {pid} on this host ({host}) no longer runs (a killed run)")
        os.unlink(path)
    try:
        with os.fdopen(fd, 'w') as f:
            json.dump(me, f)
    except OSError as e:  # a lock that names no one would block every later run: none rather than that
        os.unlink(path)
        raise SystemExit(f"{prog}: cannot write the lock {path}: {e.strerror or e} (is the disk full?)") from None

    def release():
        try:
            with open(path) as f:
                if json.load(f) == me:
                    os.unlink(path)
        except (OSError, ValueError):
            pass  # already removed (release ran earlier) or unreadable: nothing of ours to remove
        if created:
            try:
                os.rmdir(directory)  # only when empty: anything the run wrote keeps it
            except OSError:
                pass  # not empty (the run wrote something) or already gone: the directory stays as it is
    atexit.register(release)
    return release


# -----------------------------------------------------------------------------------------------------
# a clean stop on SIGINT / SIGTERM, and a script's exit (also under torchrun)

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
        import torch.distributed as dist
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
