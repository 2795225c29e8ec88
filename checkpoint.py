"""
Checkpoints, and every other file the scripts write. A checkpoint is the dict train.py saves: `model_args` (the
ModelConfig fields), `model` (the state_dict), and optionally `ema`, `optimizer`, `iter_num` and the rest; it is
saved atomically and loaded back into its model with a one-line error for every way a file can fail to be one.
train.py's guards of its checkpoint: the claim on its out_dir before any work (a lock: one run per out_dir; no
checkpoint replaced by mistake), and the checks of a checkpoint a resumed run continues. Every script's outputs:
written atomically (a crash leaves the previous file), and replacing only what the script wrote itself (the rule
below), checked before any work.
"""

import atexit
import glob
import json
import os
import re
import socket
import stat
import tempfile
import warnings
import zipfile

import torch

from model import build_model
from prepare import Vocab
from system import fail


# -----------------------------------------------------------------------------------------------------
# atomic writes

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


# -----------------------------------------------------------------------------------------------------
# checkpoints

def save_checkpoint(path, ckpt):
    """torch.save, atomically (see write_atomic)."""
    write_atomic(path, lambda tmp: torch.save(ckpt, tmp))


def refusal(e):
    """What a file is, from torch.load(weights_only=True)'s refusal, without torch's advice to load it with
    weights_only=False: that runs whatever code the pickle names, the one thing not to do with a file one did
    not make (and a checkpoint train.py wrote never needs it)."""
    msg = str(e)
    if 'Weights only load failed' not in msg and 'WeightsUnpickler' not in msg:
        return f"it is not a readable PyTorch checkpoint ({type(e).__name__}: {(msg.strip().splitlines() or [''])[0]})"
    called = re.search(r"GLOBAL ([\w.]+)", msg)
    if called:
        return (f"it is a pickle that calls {called.group(1)} when unpickled (code, not a checkpoint's tensors and "
                f"plain data); torch.load(weights_only=True) never runs code from a file and refused it")
    lines = [ln.strip() for ln in msg.split('WeightsUnpickler error:', 1)[-1].splitlines() if ln.strip() and not
             any(w in ln.lower() for w in ('weights_only', 'weights only', 'documentation'))]
    return (f"torch.load(weights_only=True), which never runs code from a file, refused it" +
            (f" ({lines[0]})" if lines else "") + ": not a checkpoint train.py writes")


def load_checkpoint(path, device='cpu', use_ema=True):
    """Rebuild the model from `model_args` and load its weights (EMA ones when present and use_ema).

    `path` is a checkpoint file or an out_dir holding ckpt.pt. Returns (model in eval mode, checkpoint dict).
    """
    if os.path.isdir(path):
        path = os.path.join(path, 'ckpt.pt')
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path} (train one with train.py, which writes out_dir/ckpt.pt)")
    with open(path, 'rb') as f:
        head = f.read(8)
    if not head:
        raise ValueError(f"{path} is empty (0 bytes): not a checkpoint (a copy or a save that did not finish?)")
    if not head.startswith((b'PK', b'\x80')):  # torch.save writes a zip archive (or, long ago, a bare pickle)
        raise ValueError(f"{path} is not a PyTorch checkpoint: it starts with {head!r}, not a zip or pickle header")
    try:
        with warnings.catch_warnings():  # torch warns about a foreign pickle's protocol before refusing it
            warnings.simplefilter('ignore')
            ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - every way a file can fail to unpickle ends in the same one line
        raise ValueError(f"{path} was not loaded: {refusal(e)}") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint (train.py saves a dict with "
                         f"model_args and model)")
    missing = [k for k in ('model_args', 'model') if k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a checkpoint of this project: missing key(s) {missing}")
    try:
        model = build_model(dict(ckpt['model_args']))
        state = ckpt['ema'] if use_ema and ckpt.get('ema') is not None else ckpt['model']
        model.load_state_dict(state)
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        raise ValueError(f"{path}: its weights do not fit its model_args ({str(e).strip().splitlines()[0]})") from None
    bad = next((n for n, p in model.named_parameters() if not p.isfinite().all()), None)
    if bad:  # a diverged run's weights: every sample and score from them would be garbage
        raise ValueError(f"{path}: its {'EMA ' if state is ckpt.get('ema') else ''}weights hold non-finite values "
                         f"({bad}): a diverged run's checkpoint; train again from the last good one")
    model.to(device).eval()
    return model, ckpt


# -----------------------------------------------------------------------------------------------------
# the out_dir of a run: claimed and locked before any work, and the checkpoint a resumed run continues

def claim_out_dir(out_dir, replace_ok, writer, prog='train.py'):
    """Before any work: no checkpoint in out_dir that a fresh run would replace (unless replace_ok: a resumed run, or
    --overwrite=True) and, for the process that will write it (writer), out_dir writable and taken by no other run.
    Returns the lock's release function (None where this process holds no lock)."""
    ckpt_path, log_path = os.path.join(out_dir, 'ckpt.pt'), os.path.join(out_dir, 'eval_log.jsonl')
    if not replace_ok and os.path.exists(ckpt_path):
        fail(prog, f"{ckpt_path} exists and init_from='scratch' would replace it: continue it with "
                        f"--init_from=resume, replace it with --overwrite=True, or use another out_dir")
    # an earlier run's evaluations without its checkpoint; checked after the lock, so that a live run's out_dir is
    # named as that (its log is not yet an earlier run's)
    stale_log = not replace_ok and os.path.isfile(log_path) and os.path.getsize(log_path)
    stale_msg = (f"{log_path} holds an earlier run's evaluations and init_from='scratch' would start it anew: "
                 f"replace it with --overwrite=True, or use another out_dir")
    if not writer:
        if stale_log:
            fail(prog, stale_msg)
        return None
    created = not os.path.exists(out_dir)  # a run that fails before writing anything removes it again
    check_writable(out_dir, 'out_dir', prog, is_dir=True)
    release = lock_dir(out_dir, prog, created)
    if stale_log:
        release()
        fail(prog, stale_msg)
    # temp files of saves that a kill -9 interrupted (ours now: the lock says no other run writes here)
    stale = glob.glob(os.path.join(glob.escape(out_dir), '.ckpt.pt.*.tmp'))
    for f in stale:
        os.remove(f)
    if stale:
        print(f"{prog}: removed {len(stale)} temp file(s) of an interrupted save from {out_dir}")
    return release


def resume_checkpoint(path, settings, meta, data_dir):
    """The checkpoint a resumed run continues, loaded on the CPU: (model, ckpt). A ValueError, in one line, where there
    is none, where it does not load, where a model setting of the run differs from the checkpoint's (dropout may:
    it only changes training), or where it was trained on other data than `meta` (data_dir's meta.json) describes."""
    if not os.path.isfile(path):
        raise ValueError(f"init_from='resume' but there is no checkpoint at {path}")
    try:
        model, ckpt = load_checkpoint(path, device='cpu', use_ema=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot resume: {e}") from None
    old = ckpt.get('meta') or {}
    if old and Vocab(old).key != Vocab(meta).key:
        raise ValueError(f"{path} was trained on {Vocab(old)}, but {data_dir} holds {Vocab(meta)}: its ids mean "
                         f"other tokens; resume on the data it was trained on")
    # the model is the checkpoint's: a shape setting that says otherwise is a mistake, not a silent choice (vocab_size
    # 0, the data's, takes the checkpoint's like a setting not given)
    differ = [(k, settings[k], v) for k, v in ckpt['model_args'].items()
              if k in settings and settings[k] != v and k != 'dropout' and not (k == 'vocab_size' and settings[k] == 0)]
    if differ:
        raise ValueError("resume: " + "; ".join(f"{k}={a!r} in the config but {b!r} in {path}" for k, a, b in differ) +
                         ": a resumed run keeps the checkpoint's model; drop the override, or start a fresh run "
                         "elsewhere")
    for k in ('tokenizer', 'vocab_size', 'eot_token'):
        if k in old and k in meta and old[k] != meta[k]:
            raise ValueError(f"the checkpoint was trained on data with {k}={old[k]!r} but {data_dir}/meta.json "
                             f"says {meta[k]!r}")
    return model, ckpt


def restore_training(ckpt, optimizer, scaler, ema, settings, log):
    """What a resumed run takes from its checkpoint besides the weights and counters: the optimizer, loss scaler and
    EMA states; and a report (log) of the settings that differ from the checkpoint's run."""
    optimizer.load_state_dict(ckpt['optimizer'])
    if ckpt.get('scaler'):
        scaler.load_state_dict(ckpt['scaler'])
    if ema is not None:
        if ckpt.get('ema') is not None:
            ema.load_state_dict(ckpt['ema'])
        else:
            log("resume: the checkpoint has no EMA; the EMA starts from the current weights")
    changed = {k: v for k, v in (ckpt.get('config') or {}).items()
               if k in settings and settings[k] != v and k not in ('init_from', 'eval_only')}
    if changed:
        log("resume: settings that differ from the checkpoint's run: " +
            ", ".join(f"{k}={settings[k]!r} (was {v!r})" for k, v in changed.items()))


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
