"""Tests of checkpoint.py: a checkpoint saved atomically loads back into the same model; a failed write leaves the
previous file; the output rule knows a checkpoint by its content and refuses to write over one; the out_dir lock
survives a full disk. (The one-line errors of files that are not checkpoints are tested through sample.py, each
script's use of the output rule through its own tests, and the out_dir and resume guards through train.py.)"""
import json
import os

import pytest
import torch

import checkpoint
from checkpoint import check_output, load_checkpoint, lock_dir, protected_kind, save_checkpoint, write_atomic
from model import ModelConfig, build_model

TINY = dict(block_size=16, n_layer=2, n_head=2, n_embd=32, T=50, embed_dim=8)


def tiny(model_type='embed', **kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(**{**TINY, 'vocab_size': 100, 'model_type': model_type, **kw}))


def test_checkpoint_roundtrip(tmp_path):
    m = tiny('embed', self_cond=False)
    path = tmp_path / 'ckpt.pt'
    save_checkpoint(str(path), {'model_args': {**TINY, 'vocab_size': 100, 'self_cond': False},
                                'model': m.state_dict(), 'ema': None})
    assert [p.name for p in tmp_path.iterdir()] == ['ckpt.pt']  # no temp file left behind
    m2, ckpt = load_checkpoint(str(tmp_path))
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(FileNotFoundError, match='no checkpoint'):
        load_checkpoint(str(tmp_path / 'nowhere'))


def test_a_write_that_fails_leaves_the_previous_file_and_no_temp_file(tmp_path):
    path = tmp_path / 'results.json'
    path.write_text('{"old": 1}\n')

    def half_then_fail(tmp):
        with open(tmp, 'w') as f:
            f.write('{"new": ')
        raise OSError(28, 'No space left on device')
    with pytest.raises(OSError):
        write_atomic(str(path), half_then_fail)
    assert path.read_text() == '{"old": 1}\n' and os.listdir(tmp_path) == ['results.json']


def test_a_checkpoint_of_any_name_is_never_written_over(tmp_path):
    """torch.save's zip archive is known by its content, whatever the file is called, and no script replaces it, not
    even with overwrite=True; a file of no recognised kind needs overwrite=True."""
    disguised = tmp_path / 'notes.txt'
    torch.save({'model': torch.zeros(2)}, disguised)
    assert protected_kind(str(disguised)) == 'a checkpoint'
    with pytest.raises(SystemExit) as e:
        check_output(str(disguised), 'out_file', 'sample.py', overwrite=True)
    assert str(e.value.code) == (f"sample.py: out_file='{disguised}' is a checkpoint; sample.py never writes over "
                                 f"one, not even with --overwrite=True: choose another path")
    plain = tmp_path / 'plain.txt'
    plain.write_text('a note\n')
    assert protected_kind(str(plain)) is None
    with pytest.raises(SystemExit, match="exists and is not sample.py's own out_file"):
        check_output(str(plain), 'out_file', 'sample.py')
    check_output(str(plain), 'out_file', 'sample.py', overwrite=True)


def test_a_lock_that_could_not_be_written_is_removed(tmp_path, monkeypatch):
    """A full disk while taking the lock must not leave a 0-byte run.lock, which would block every later run."""
    def full(*a, **k):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(checkpoint.json, 'dump', full)
    with pytest.raises(SystemExit) as e:
        lock_dir(str(tmp_path), 'train.py')
    assert str(e.value.code).startswith(f"train.py: cannot write the lock {tmp_path / 'run.lock'}: No space left")
    assert not (tmp_path / 'run.lock').exists()
    monkeypatch.undo()
    release = lock_dir(str(tmp_path), 'train.py')  # with room on the disk: taken, naming this process, and released
    assert json.loads((tmp_path / 'run.lock').read_text())['pid'] == os.getpid()
    release()
    assert not (tmp_path / 'run.lock').exists()
