"""
Checkpoints: save one atomically, and load one back into its model, with a one-line error for every way a file
can fail to be a checkpoint of this project. A checkpoint is the dict train.py saves: `model_args` (the
ModelConfig fields), `model` (the state_dict), and optionally `ema`, `optimizer`, `iter_num` and the rest.
Also train.py's two guards of its checkpoint: the claim on its out_dir before any work (no checkpoint replaced by
mistake, one run per out_dir), and the checks of a checkpoint a resumed run continues.
"""

import glob
import os
import re
import warnings

import torch

import util
from model import build_model
from prepare import Vocab
from util import check_writable, lock_dir, write_atomic


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


def claim_out_dir(out_dir, replace_ok, writer, prog='train.py'):
    """Before any work: no checkpoint in out_dir that a fresh run would replace (unless replace_ok: a resumed run, or
    --overwrite=True) and, for the process that will write it (writer), out_dir writable and taken by no other run.
    Returns the lock's release function (None where this process holds no lock)."""
    ckpt_path, log_path = os.path.join(out_dir, 'ckpt.pt'), os.path.join(out_dir, 'eval_log.jsonl')
    if not replace_ok and os.path.exists(ckpt_path):
        util.fail(prog, f"{ckpt_path} exists and init_from='scratch' would replace it: continue it with "
                        f"--init_from=resume, replace it with --overwrite=True, or use another out_dir")
    # an earlier run's evaluations without its checkpoint; checked after the lock, so that a live run's out_dir is
    # named as that (its log is not yet an earlier run's)
    stale_log = not replace_ok and os.path.isfile(log_path) and os.path.getsize(log_path)
    stale_msg = (f"{log_path} holds an earlier run's evaluations and init_from='scratch' would start it anew: "
                 f"replace it with --overwrite=True, or use another out_dir")
    if not writer:
        if stale_log:
            util.fail(prog, stale_msg)
        return None
    created = not os.path.exists(out_dir)  # a run that fails before writing anything removes it again
    check_writable(out_dir, 'out_dir', prog, is_dir=True)
    release = lock_dir(out_dir, prog, created)
    if stale_log:
        release()
        util.fail(prog, stale_msg)
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
