"""
Checkpoints: save one atomically, and load one back into its model, with a one-line error for every way a file
can fail to be a checkpoint of this project. A checkpoint is the dict train.py saves: `model_args` (the
ModelConfig fields), `model` (the state_dict), and optionally `ema`, `optimizer`, `iter_num` and the rest.
"""

import os
import re
import warnings

import torch

from model import build_model
from util import write_atomic


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
    model.to(device).eval()
    return model, ckpt
