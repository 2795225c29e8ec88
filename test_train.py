"""Tests of configurator.py, train.py and config/: overrides, a real short run, resume, DDP, AMP, compile, errors.

Training runs use real TinyStories tokens (a few hundred stories, prepared once per session by prepare.py)
and a tiny embed model, so the whole file stays within a few minutes on two CPU cores.
"""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from configurator import configure
from conftest import tinystories_documents
from model import ModelConfig, load_checkpoint
from prepare import TokenWindows, unigram_logprobs

ROOT = os.path.dirname(os.path.abspath(__file__))
# a model small enough that one iteration takes tens of milliseconds, still with the real 50,257-id vocabulary
TINY = ['--model_type=embed', '--n_layer=1', '--n_head=2', '--n_embd=32', '--block_size=32', '--embed_dim=16',
        '--batch_size=8', '--learning_rate=3e-3', '--warmup_iters=2', '--eval_iters=2', '--log_interval=1',
        '--device=cpu', '--dtype=float32', '--peak_flops=1e11', '--tensorboard_log=False']
EVAL_LINE = re.compile(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)")


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
    """Real tokens: the first 400 shared TinyStories stories through prepare.py's CLI."""
    tmp = tmp_path_factory.mktemp('tinystories')
    text = tmp / 'stories.txt'
    text.write_text('\n<|endoftext|>\n'.join(tinystories_documents(limit=400)) + '\n', encoding='utf-8')
    out = tmp / 'data'
    subprocess.run([sys.executable, 'prepare.py', f'--input={text}', f'--out_dir={out}', '--num_proc=1'],
                   cwd=ROOT, check=True, capture_output=True, text=True)
    return str(out)


def run_train(args, check=True, timeout=240, launcher=()):
    """train.py in a subprocess; returns its combined stdout + stderr (and asserts success if check)."""
    p = subprocess.run([*launcher, *([sys.executable, 'train.py'] if not launcher else ['train.py']), *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    out = p.stdout + p.stderr
    if check:
        assert p.returncode == 0, out
    return p.returncode, out


def evals(out):
    return [(int(i), float(tr), float(va)) for i, tr, va in EVAL_LINE.findall(out)]


def weights(path):
    return torch.load(os.path.join(path, 'ckpt.pt'), map_location='cpu', weights_only=True)


@pytest.fixture(scope='session')
def short_run(data_dir, tmp_path_factory):
    """30 iterations with TensorBoard on and a checkpoint at each evaluation; returns (out_dir, output)."""
    out_dir = str(tmp_path_factory.mktemp('short') / 'out')
    _, out = run_train([*TINY, f'--data_dir={data_dir}', f'--out_dir={out_dir}', '--max_iters=30',
                        '--eval_interval=10', '--tensorboard_log=True'])
    return out_dir, out


# --------------------------------------------------------------------------------------------------
# configurator.py

DEFAULTS = dict(batch_size=8, learning_rate=1e-3, compile=False, device='cpu', betas=(0.9, 0.95), name=None)


def conf(argv, **extra):
    ns = {**DEFAULTS, **extra}
    configure(ns, argv, verbose=False, prog='t.py')
    return ns


def conf_error(argv):
    with pytest.raises(SystemExit) as e:
        conf(argv)
    assert isinstance(e.value.code, str), "errors must exit with a message (non-zero status)"
    return e.value.code


def test_configurator_overrides_and_types():
    ns = conf(['--batch_size=16', '--learning_rate=2', '--compile=True', '--device=cuda:1', '--betas=[0.8, 0.9]',
               '--name=2024'])
    assert ns['batch_size'] == 16
    assert ns['learning_rate'] == 2.0 and isinstance(ns['learning_rate'], float)  # int accepted for a float
    assert ns['compile'] is True
    assert ns['device'] == 'cuda:1'                                               # a bare word stays a string
    assert ns['betas'] == (0.8, 0.9)                                              # list -> the default's tuple
    assert ns['name'] == 2024                                                     # default None: any literal
    assert conf(["--device='cpu'"])['device'] == 'cpu'                           # a quoted literal works too
    assert conf(['--device=2024'])['device'] == '2024'                           # a str setting keeps the text


def test_configurator_config_file(tmp_path):
    f = tmp_path / 'c.py'
    f.write_text("import math\n_scratch = 3\nbatch_size = batch_size * 4  # reads the current value\n"
                 "learning_rate = math.sqrt(4)\ndef helper():\n    pass\n")
    ns = conf([str(f), '--batch_size=5'])  # later arguments win
    assert ns['batch_size'] == 5 and ns['learning_rate'] == 2.0
    assert conf([str(f)])['batch_size'] == 32
    assert '_scratch' not in ns and 'math' not in ns and 'helper' not in ns


@pytest.mark.parametrize('argv, words', [
    (['--batchsize=4'], ["'batchsize'", "'batch_size'", '--batchsize=4']),
    (['--batch_size=4.5'], ['batch_size=4.5', 'expected an int']),
    (['--batch_size=four'], ['batch_size', 'expected an int']),
    (['--compile=1'], ['compile=1', 'expected a bool']),
    (['--compile=true'], ['compile', 'expected a bool']),
    (['--learning_rate=fast'], ['learning_rate', 'expected a float']),
    (['--betas=0.9'], ['betas', 'expected a tuple']),
    (['--batch_size'], ["'--batch_size'", "--key=value"]),
    (['no_such_file.py'], ["no_such_file.py", 'not found']),
])
def test_configurator_errors(argv, words):
    msg = conf_error(argv)
    assert msg.startswith('t.py: ') and '\n' not in msg
    for w in words:
        assert w in msg, msg


def test_configurator_unknown_key_in_file(tmp_path):
    f = tmp_path / 'typo.py'
    f.write_text("batch_size = 4\nlearning_rat = 3e-4\n")
    msg = conf_error([str(f)])
    assert str(f) in msg and "'learning_rat'" in msg and "'learning_rate'" in msg
    f.write_text("batch_size = 'big'\n")
    assert 'expected an int' in conf_error([str(f)])
    f.write_text("batch_size = undefined_name\n")
    assert 'NameError' in conf_error([str(f)])


def test_configurator_help(capsys):
    with pytest.raises(SystemExit) as e:
        conf(['--help'])
    assert e.value.code == 0 and '--batch_size=8' in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# train.py's settings and config/

def test_train_has_every_model_config_field_with_its_default():
    for f in ModelConfig.__dataclass_fields__.values():
        assert f.name in train._config_keys, f"train.py lacks a config global for ModelConfig.{f.name}"
        assert getattr(train, f.name) == f.default, f"train.{f.name} != ModelConfig default {f.default!r}"


def config_of(path):
    ns = {k: getattr(train, k) for k in train._config_keys}
    configure(ns, [path], keys=train._config_keys, verbose=False, prog='train.py')
    return ns


def test_config_files():
    # the training configs: a CPU and a GPU-scale one per family (config/ also holds other scripts' configs)
    paths = sorted(os.path.join('config', p) for p in os.listdir(os.path.join(ROOT, 'config'))
                   if p.endswith(('_cpu.py', '_tinystories.py')))
    cfgs = {p: config_of(os.path.join(ROOT, p)) for p in paths}
    assert cfgs['config/dit_tinystories.py'] == cfgs['config/embed_tinystories.py']  # the README's name for it
    shared = ('n_layer', 'n_head', 'n_embd', 'block_size', 'batch_size', 'gradient_accumulation_steps',
              'max_iters', 'learning_rate', 'dataset')
    for group in ('_long_cpu.py', '_cpu.py', '_tinystories.py'):
        members = {p: c for p, c in cfgs.items() if p.endswith(group) and not (group == '_cpu.py' and '_long' in p)}
        assert {c['model_type'] for c in members.values()} == {'embed', 'bits', 'analog', 'mask', 'ar'}, group
        assert len({c['out_dir'] for c in members.values()}) == 5, f"{group} configs must not share an out_dir"
        for k in shared:  # every family gets the same backbone and token budget (the long runs: each its own)
            if not (group == '_long_cpu.py' and k == 'max_iters'):
                assert len({c[k] for c in members.values()}) == 1, f"{group} configs differ in {k}"
        for c in members.values():
            ModelConfig(**{k: c[k] for k in ModelConfig.__dataclass_fields__})  # a valid model


# --------------------------------------------------------------------------------------------------
# training runs

def test_short_run_loss_falls_and_checkpoint_loads(short_run):
    out_dir, out = short_run
    e = evals(out)
    assert [i for i, _, _ in e] == [0, 10, 20, 30]
    assert e[-1][2] < e[0][2] - 0.2, f"val loss did not fall clearly: {e}"
    assert e[-1][1] < e[0][1] - 0.2, f"train loss did not fall clearly: {e}"
    assert re.search(r"iter 30: loss [\d.]+, lr [\d.e+-]+, [\d.]+ ms/iter, [\d,]+ tok/s, mfu [\d.]+%", out), out
    model, ckpt = load_checkpoint(out_dir, use_ema=False)  # the shared loader rebuilds it
    assert ckpt['iter_num'] == 30 and ckpt['model_args']['n_embd'] == 32 and ckpt['ema'] is None
    assert ckpt['config']['max_iters'] == 30 and ckpt['config']['lr_decay_iters'] == 30  # derived, stored
    assert ckpt['meta']['vocab_size'] == 50257 and ckpt['optimizer']['state']
    assert abs(ckpt['best_val_loss'] - e[-1][2]) < 1e-3
    assert os.listdir(os.path.join(out_dir, 'tb')), "no TensorBoard events"
    X = TokenWindows(ckpt['config']['data_dir'], 'val', 32).random_batch(4, step=0)
    torch.manual_seed(0)
    assert torch.isfinite(model(X))


def test_eval_log_holds_the_bound_beside_the_unigram_line(short_run):
    """Each evaluation logs held-out bits/token (the family's bound) and the unigram cross-entropy of the very
    val windows it scored, computed here again from the train split's counts."""
    out_dir, out = short_run
    with open(os.path.join(out_dir, 'eval_log.jsonl')) as f:
        recs = [json.loads(line) for line in f]
    assert [r['iter'] for r in recs] == [0, 10, 20, 30]
    assert [r['tokens'] for r in recs] == [0, 10 * 8 * 32, 20 * 8 * 32, 30 * 8 * 32]
    data_dir = weights(out_dir)['config']['data_dir']
    lp = torch.from_numpy(unigram_logprobs(data_dir, 'train'))
    val = TokenWindows(data_dir, 'val', 32)
    x = torch.cat([val.random_batch(8, step=k, seed=train._EVAL_SEED, rank=0) for k in range(2)])
    expected = -lp[x].mean().item() / math.log(2)
    assert all(abs(r['unigram_bits'] - expected) < 1e-9 for r in recs)
    assert f"unigram {expected:.3f})" in out
    assert recs[-1]['val_bits'] < recs[0]['val_bits'] and recs[-1]['train_seconds'] > recs[1]['train_seconds'] > 0


def test_resume_gives_the_same_weights_as_a_straight_run(data_dir, tmp_path):
    # EMA and gradient accumulation on, so their state and the micro-step data stream are covered too
    common = [*TINY, f'--data_dir={data_dir}', '--eval_interval=3', '--always_save_checkpoint=True',
              '--ema_decay=0.9', '--gradient_accumulation_steps=2', '--lr_decay_iters=6']
    a, b = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
    run_train([*common, f'--out_dir={a}', '--max_iters=6'])
    run_train([*common, f'--out_dir={b}', '--max_iters=3'])
    half = weights(b)
    assert half['iter_num'] == 3
    run_train([*common, f'--out_dir={b}', '--max_iters=6', '--init_from=resume'])
    wa, wb = weights(a), weights(b)
    assert wb['iter_num'] == 6
    for part in ('model', 'ema'):
        for k in wa[part]:
            assert torch.equal(wa[part][k], wb[part][k]), f"{part}.{k} differs after resume"
    # and the resume did something: the weights moved between iterations 3 and 6
    assert any(not torch.equal(half['model'][k], wb['model'][k]) for k in wb['model'])


def test_eval_only_and_killed_run_resumes(short_run, tmp_path):
    out_dir = str(tmp_path / 'out')
    shutil.copytree(short_run[0], out_dir)
    args = [*TINY, f'--data_dir={weights(out_dir)["config"]["data_dir"]}', f'--out_dir={out_dir}']
    before = os.path.getmtime(os.path.join(out_dir, 'ckpt.pt'))
    _, out = run_train([*args, '--init_from=resume', '--eval_only=True'])
    (i, _, val), = evals(out)
    assert i == 30 and abs(val - weights(out_dir)['best_val_loss']) < 1e-3  # the same fixed eval windows
    assert os.path.getmtime(os.path.join(out_dir, 'ckpt.pt')) == before

    # kill -9 in the middle of a run that checkpoints often, then resume it to the end
    p = subprocess.Popen([sys.executable, 'train.py', *args, '--init_from=resume', '--max_iters=400',
                          '--eval_interval=2', '--always_save_checkpoint=True', '--eval_iters=1'],
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while weights(out_dir)['iter_num'] < 36 and time.time() < deadline and p.poll() is None:
        time.sleep(0.5)
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_at = weights(out_dir)['iter_num']
    assert 36 <= killed_at < 400
    _, out = run_train([*args, '--init_from=resume', f'--max_iters={killed_at + 4}', '--eval_interval=2',
                        '--eval_iters=1', '--always_save_checkpoint=True'])
    assert f"step {killed_at + 4}:" in out and weights(out_dir)['iter_num'] == killed_at + 4


def test_nonfinite_loss_stops_and_keeps_the_checkpoint(short_run, tmp_path):
    out_dir = str(tmp_path / 'out')
    shutil.copytree(short_run[0], out_dir)
    path = os.path.join(out_dir, 'ckpt.pt')
    with open(path, 'rb') as f:
        before = f.read()
    # an absurd learning rate with no warmup: after one step the weights overflow and the loss is NaN
    rc, out = run_train([*TINY, f'--data_dir={weights(out_dir)["config"]["data_dir"]}', f'--out_dir={out_dir}',
                         '--init_from=resume', '--max_iters=40', '--eval_interval=1000', '--learning_rate=1e30',
                         '--warmup_iters=0', '--decay_lr=False', '--grad_clip=0'], check=False)
    assert rc != 0
    assert re.search(r"non-finite loss \((nan|inf)\) at iteration 31", out), out
    assert 'last checkpoint: iteration 30' in out
    with open(path, 'rb') as f:
        assert f.read() == before, "the checkpoint must be left as it was"


def test_ddp_two_ranks_gloo(data_dir, tmp_path):
    out_dir = str(tmp_path / 'out')
    _, out = run_train([*TINY, f'--data_dir={data_dir}', f'--out_dir={out_dir}', '--max_iters=4',
                        '--eval_interval=4', '--gradient_accumulation_steps=2', '--device=cpu'],
                       launcher=[sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2'])
    # each rank drew the windows of its own rank in TokenWindows' stream, and they differ
    m = re.search(r"ddp: 2 ranks, first micro-batch fingerprints \['(\w+)', '(\w+)'\]", out)
    assert m, out
    loader = TokenWindows(data_dir, 'train', 32)
    expect = [train.fingerprint([loader.random_batch(8, step=0, seed=train.seed, rank=r)]) for r in (0, 1)]
    assert list(m.groups()) == expect and expect[0] != expect[1]
    # and they end with bitwise identical weights
    m = re.search(r"ddp: final weight fingerprints \['(\w+)', '(\w+)'\] \(identical on all ranks\)", out)
    assert m and m.group(1) == m.group(2), out
    ckpt = weights(out_dir)
    assert ckpt['iter_num'] == 4 and train.fingerprint(ckpt['model'].values()) == m.group(1)
    assert '2 ranks x 1 micro-batches' in out


def test_bf16_autocast_on_cpu(data_dir, tmp_path):
    out_dir = str(tmp_path / 'out')
    _, out = run_train([*TINY, f'--data_dir={data_dir}', f'--out_dir={out_dir}', '--max_iters=10',
                        '--eval_interval=10', '--dtype=bfloat16'])
    assert 'dtype=bfloat16' in out
    e = evals(out)
    assert e[-1][2] < e[0][2], e
    # the weights stay fp32 under autocast (the bound's time-proposal statistics are float64 buffers)
    assert all(v.dtype in (torch.float32, torch.float64) for v in weights(out_dir)['model'].values()
               if v.is_floating_point())


def test_compile(data_dir, tmp_path):
    out_dir = str(tmp_path / 'out')
    _, out = run_train([*TINY, f'--data_dir={data_dir}', f'--out_dir={out_dir}', '--max_iters=2',
                        '--eval_interval=2', '--eval_iters=1', '--compile=True', '--self_cond=False'], timeout=400)
    assert 'compile=True' in out and weights(out_dir)['iter_num'] == 2
    # the checkpoint holds the un-compiled module's names (no _orig_mod. prefix), so the loader reads it
    assert not any(k.startswith('_orig_mod') for k in weights(out_dir)['model'])
    load_checkpoint(out_dir)


# --------------------------------------------------------------------------------------------------
# bad configurations: one clear line and a non-zero exit

def test_bad_configuration_exits_with_a_clear_message(data_dir, tmp_path):
    rc, out = run_train([*TINY, f'--data_dir={data_dir}', '--n_embdd=64'], check=False)
    assert rc != 0 and "unknown config key 'n_embdd'; did you mean 'n_embd'?" in out and 'Traceback' not in out
    f = tmp_path / 'bad.py'
    f.write_text("max_iter = 10\n")
    rc, out = run_train([str(f)], check=False)
    assert rc != 0 and "unknown config key 'max_iter'; did you mean 'max_iters'?" in out and str(f) in out


@pytest.mark.parametrize('argv, words', [
    (['--batch_size=8.0'], ['batch_size=8.0', 'expected an int']),
    (['--data_dir=/nonexistent/data'], ["'/nonexistent/data' does not exist", 'prepare.py']),
    (['--vocab_size=1000'], ['vocab_size=1000', "data's vocab_size=50257"]),
    (['--block_size=100000'], ['block_size=100000', 'fewer than one window']),
    (['--model_type=diffusion'], ['model_type', 'diffusion']),
    (['--init_from=resume'], ["no checkpoint"]),
    (['--eval_only=True'], ["init_from=resume"]),
    (['--dtype=float16'], ["float16", 'CUDA']),
    (['--dtype=fp8'], ["dtype='fp8'"]),
])
def test_bad_configuration_in_process(argv, words, data_dir, tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main([*TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path}', *argv])
    msg = str(e.value.code)
    assert msg.startswith('train.py: '), msg
    for w in words:
        assert w in msg, msg
