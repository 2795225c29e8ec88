"""probe.py: how much a prediction draws on its context, on toy models whose context says everything."""
import dataclasses
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

import probe
from checkpoint import save_checkpoint
from conftest import compact_prepared, tinystories_documents, train_steps
from model import ModelConfig, build_model
from prepare import prepare
from probe import probe_mask, probe_noisy

# window k is token k repeated: the token at any position is given by any other position, and by nothing else;
# probed: 64 windows (8 rounds of the 8), each at a random position, each beside a window of another token
WINDOWS = torch.arange(8).repeat_interleave(16).view(8, 16)
PROBED = WINDOWS.repeat(8, 1)
POS = torch.randint(0, 16, (64,), generator=torch.Generator().manual_seed(0))


def trained(model_type, steps, lr, **kw):
    torch.manual_seed(0)
    m = build_model(ModelConfig(model_type=model_type, vocab_size=16, block_size=16, n_layer=2, n_head=2, n_embd=32,
                                **kw))
    train_steps(m, WINDOWS, steps, lr=lr)
    return m.eval()


def test_mask_probe_sees_the_context_go_as_it_is_masked():
    out = probe_mask(trained('mask', 150, 1e-2), PROBED, POS, [0.0, 0.5, 1.0], torch.Generator().manual_seed(0))
    nats = {f: v.mean().item() for f, v in out.items()}
    assert nats[0.0] < 0.3 and nats[0.5] < 0.3  # one visible position names the window
    assert nats[1.0] > math.log(8) - 0.5        # none visible: at best the 8 windows' frequencies


@pytest.mark.slow
def test_noisy_probe_gain_is_what_the_context_adds():
    m = trained('bits', 600, 3e-3, T=100, noise_schedule='cosine')
    out = probe_noisy(m, PROBED, POS, [40, 100], torch.Generator().manual_seed(0))
    own, other = (v.mean().item() for v in out[40])
    assert own < 0.5 and other - own > 2.0  # at t = 40 the other window's noisy tokens name another token
    own, other = (v.mean().item() for v in out[100])
    assert other - own == pytest.approx(0.0, abs=0.2)  # at t = T the context is pure noise either way


# ---------------------------------------------------------------- hostile inputs

@pytest.fixture(scope='module')
def probe_ckpt(tmp_path_factory):
    """An untrained mask checkpoint on real prepared stories (ids compacted), saved as train.py saves one."""
    root = tmp_path_factory.mktemp('probe')
    text = root / 'stories.txt'
    text.write_text('\n<|endoftext|>\n'.join(tinystories_documents(limit=120)), encoding='utf-8')
    data = str(root / 'data')
    prepare(input=str(text), out_dir=data, val_frac=0.1, test_frac=0.1, num_proc=1)
    meta = compact_prepared(data)
    torch.manual_seed(0)
    m = build_model(ModelConfig(model_type='mask', vocab_size=meta['vocab_size'], block_size=16, n_layer=1, n_head=2,
                                n_embd=16))
    out = str(root / 'out')
    save_checkpoint(os.path.join(out, 'ckpt.pt'), {'model_args': dataclasses.asdict(m.config), 'model': m.state_dict(),
                                                   'iter_num': 0, 'config': {'data_dir': data}, 'meta': meta})
    return out, data


def test_a_split_with_an_id_beyond_the_vocabulary_is_one_line(probe_ckpt, tmp_path):
    out, data = probe_ckpt
    bad = tmp_path / 'data'
    shutil.copytree(data, bad)
    ids = np.fromfile(bad / 'val.bin', dtype=np.uint16)
    ids[-1] = 65000  # past the windows probed: only a check of the whole split sees it
    ids.tofile(bad / 'val.bin')
    with pytest.raises(SystemExit) as e:
        probe.main([f'--ckpt={out}', f'--data_dir={bad}', '--windows=2'])
    msg = str(e.value.code)
    assert msg.startswith(f"probe.py: data of '{out}' ('{bad}'): {bad}/val.bin holds token id 65000") and \
        '\n' not in msg, msg


def test_out_file_replaces_only_its_own_json(probe_ckpt, tmp_path):
    out, _ = probe_ckpt
    notes, ckpt = tmp_path / 'notes.json', os.path.join(out, 'ckpt.pt')
    notes.write_text('{"hours": "of work"}')
    for path, overwrite, words in ((notes, False, "exists and is not probe.py's own out_file"),
                                   (ckpt, True, 'is a checkpoint; probe.py never writes over one')):
        with pytest.raises(SystemExit) as e:
            probe.main([f'--ckpt={out}', '--windows=2', f'--out_file={path}', f'--overwrite={overwrite}'])
        assert str(e.value.code).startswith(f"probe.py: out_file='{path}' {words}"), e.value.code
    assert notes.read_text() == '{"hours": "of work"}'
    probe.main([f'--ckpt={out}', '--windows=2', f'--out_file={notes}', '--overwrite=True', '--fractions=[0.5]'])
    probe.main([f'--ckpt={out}', '--windows=2', f'--out_file={notes}', '--fractions=[0.5]'])  # its own: rewritten
    assert json.loads(notes.read_text())['windows'] == 2
