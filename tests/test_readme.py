"""The README keeps its promises: every command in its shell blocks names scripts, config files and --keys that
exist, and the quick start, training and sampling blocks run as written in a fresh copy of the repository, each
command with tiny-size overrides appended (so the whole walk takes about a minute on two cores).

Not run, only checked: commands that need the network (the Hugging Face hub, GPT-2 Large), GPUs or several
machines, the long runs of the results section, and `tensorboard` (a server; its log directory is checked)."""
import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from configurator import configure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root (this file is in tests/)
with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as _f:
    README = _f.read()

# appended to every command a block runs: the smallest models and runs that still exercise each path
TINY_TRAIN = ['--n_layer=1', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=4', '--max_iters=2',
              '--eval_interval=2', '--eval_iters=1', '--log_interval=1', '--warmup_iters=1', '--peak_flops=1e11']
TINY_SAMPLE = ['--num_samples=1', '--steps=2', '--device=cpu']


def shell_blocks(text=README):
    """{heading: [command, ...]} of a document's ``` blocks that hold shell commands (not ```python ones); a command
    is a list of words (shell quoting and comments removed, `a && b` split, a `for` loop expanded)."""
    blocks, heading, block = {}, '', None
    for line in text.splitlines():
        if block is None and line.startswith('#'):
            heading = line.lstrip('# ').strip()
        elif line.startswith('```'):
            if block is None:
                block = [] if line.strip() == '```' else 'other'
            else:
                if block != 'other':
                    blocks.setdefault(heading, []).extend(block)
                block = None
        elif isinstance(block, list) and line.strip():
            loop = re.fullmatch(r'for (\w+) in ([^;]+); do (.+); done', line.strip())
            lines = [loop.group(3).replace('${' + loop.group(1) + '}', v) for v in loop.group(2).split()] \
                if loop else [line]
            for text in lines:
                words = shlex.split(text, comments=True)
                while words:
                    cut = words.index('&&') if '&&' in words else len(words)
                    block.append(words[:cut])
                    words = words[cut + 1:]
    return blocks


BLOCKS = shell_blocks()


def script_and_args(cmd):
    """(script, its arguments) of a `python X.py ...` or `torchrun ... X.py ...` command, else (None, None)."""
    for i, w in enumerate(cmd):
        if w.endswith('.py') and cmd[0] in ('python', 'torchrun'):
            return w, cmd[i + 1:]
    return None, None


def test_the_blocks_are_found():
    assert {'Diffusion language models, nanoGPT style', 'Training: `train.py`', 'Sampling: `sample.py`'} <= set(BLOCKS)
    assert sum(len(b) for b in BLOCKS.values()) >= 30


def other_docs_blocks():
    """The shell blocks of GUIDE.md and EXPERIMENTS.md: checked like the README's, never run (long runs)."""
    out = []
    for name in ('GUIDE.md', 'EXPERIMENTS.md'):
        with open(os.path.join(ROOT, name), encoding='utf-8') as f:
            out += [c for b in shell_blocks(f.read()).values() for c in b]
    return out


def test_every_command_names_existing_scripts_configs_and_keys():
    import prepare
    assert len(other_docs_blocks()) >= 10
    for cmd in [c for b in BLOCKS.values() for c in b] + other_docs_blocks():
        script, args = script_and_args(cmd)
        if script is None:
            assert cmd[0] in ('python3', '.', 'pip', 'tensorboard') or cmd[:3] == ['python', '-m', 'pytest'], cmd
            continue
        assert os.path.isfile(os.path.join(ROOT, script)), cmd
        if script == 'prepare.py':
            assert all(a.split('=')[0][2:] in prepare.DEFAULTS for a in args), cmd
            continue
        keys = importlib.import_module(script[:-3])._config_keys
        for a in args:
            if a.startswith('--'):
                assert a[2:].split('=')[0] in keys, (a, cmd)
            else:  # a config file: it exists, and every key it sets is the script's
                assert os.path.isfile(os.path.join(ROOT, a)), (a, cmd)
                cwd = os.getcwd()
                os.chdir(ROOT)  # config files import their shared part from config/
                try:
                    ns = {k: getattr(importlib.import_module(script[:-3]), k) for k in keys}
                    configure(ns, [a], keys=keys, verbose=False, prog=script)
                finally:
                    os.chdir(cwd)


@pytest.fixture(scope='module')
def clone(tmp_path_factory):
    """A fresh copy of the repository's files (as git lists them) beside ../shared, as a clone would sit; no data,
    no outputs. Returns run(cmd, cwd): run one README command there, with the tiny overrides appended."""
    root = tmp_path_factory.mktemp('readme')
    git = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard'], cwd=ROOT,
                         capture_output=True, text=True)
    files = git.stdout.split() if git.returncode == 0 else [  # not a git checkout: the sources and configs
        os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(ROOT) for f in fs
        if f.endswith(('.py', '.md', '.txt')) and os.path.relpath(d, ROOT) in ('.', 'config', 'tests')]
    for name in ('a', 'b'):
        for f in files:
            if not f.startswith('data/') and os.path.isfile(os.path.join(ROOT, f)):
                os.makedirs(os.path.dirname(os.path.join(root, name, f)), exist_ok=True)
                shutil.copy2(os.path.join(ROOT, f), os.path.join(root, name, f))
    os.symlink(os.path.join(os.path.dirname(ROOT), 'shared'), root / 'shared')
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}

    def run(cmd, where):
        script, _ = script_and_args(cmd)
        extra = TINY_TRAIN if script == 'train.py' else TINY_SAMPLE if script == 'sample.py' else []
        argv = ([sys.executable] + cmd[1:] if cmd[0] == 'python' else
                [sys.executable, '-m', 'torch.distributed.run'] + cmd[1:])
        p = subprocess.run(argv + extra, cwd=root / where, capture_output=True, text=True, timeout=600, env=env)
        assert p.returncode == 0, f"README command failed: {shlex.join(cmd)}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
        return p.stdout
    return root, run


def runnable(cmd):
    """Commands the walk runs: this repo's scripts on CPU-sized configs (no GPU, no network, no second machine)."""
    script, args = script_and_args(cmd)
    return script is not None and not any(a.endswith('_tinystories.py') or a.startswith('--nnodes') for a in cmd)


@pytest.mark.slow
def test_quick_start_then_sampling_run_as_written(clone):
    root, run = clone
    quick = BLOCKS['Diffusion language models, nanoGPT style']  # set up, then the main job (and the test command)
    assert [c for c in quick if runnable(c)] == [
        ['python', 'prepare.py', '--input=../shared/data/tinystories', '--vocab=compact'],
        ['python', 'train.py', 'config/embed_cpu.py'],
        ['python', 'sample.py', '--out_dir=out-embed-cpu']] and quick[0][0] == 'python3'  # the rest: install
    done = []
    for cmd in [c for c in quick if runnable(c)] + BLOCKS['Sampling: `sample.py`']:
        if cmd not in done:  # the sampling block starts with the quick start's last command
            run(cmd, 'a')
            done.append(cmd)
    assert len(done) == 6
    out = root / 'a' / 'out-embed-cpu'
    assert (out / 'ckpt.pt').is_file() and (out / 'trajectory.png').is_file() and (out / 'samples.jsonl').is_file()
    # everything the commands wrote is covered by .gitignore: a user's checkout shows no untracked outputs
    copied = set(subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard'], cwd=ROOT,
                                capture_output=True, text=True).stdout.split())
    written = [os.path.relpath(os.path.join(d, f), root / 'a') for d, _, fs in os.walk(root / 'a') for f in fs]
    written = [f for f in written if f not in copied and '__pycache__' not in f]
    assert written and 'out-embed-cpu/samples.jsonl' in written
    check = subprocess.run(['git', 'check-ignore', '--no-index', '--verbose', '--non-matching', *written], cwd=ROOT,
                           capture_output=True, text=True)
    assert not [line for line in check.stdout.splitlines() if line.startswith('::')], check.stdout


@pytest.mark.slow
def test_training_block_runs_as_written(clone):
    root, run = clone
    run(['python', 'prepare.py', '--input=../shared/data/tinystories', '--vocab=compact'], 'b')  # a second copy, with data
    block = BLOCKS['Training: `train.py`']
    done = []
    for cmd in block:
        if runnable(cmd):
            run(cmd, 'b')
            done.append(cmd)
        elif cmd[0] == 'tensorboard':
            assert (root / 'b' / cmd[cmd.index('--logdir') + 1]).is_dir(), cmd
    assert ['torchrun', '--standalone', '--nproc_per_node=2', 'train.py', 'config/ar_cpu.py', '--device=cpu'] in done
    assert len(block) - len(done) == 2  # all but the GPU run and tensorboard (GUIDE.md has the multi-node ones)


def test_families_table_says_how_the_bits_bound_is_computed():
    """The `bits` row's likelihood cell describes BitFlipDiffusion.step_kl: a KL over the joint k-bit code, exact on
    the posterior's mode and its k one-flip neighbours plus a one-draw estimate of the rest (not per-bit KLs)."""
    from diffusion import BitFlipDiffusion
    row = next(line for line in README.splitlines() if line.startswith("| `bits` | the token id's k bits"))
    likelihood = row.strip('| ').split(' | ')[-1]
    assert 'per-bit' not in likelihood and 'joint k-bit code' in likelihood and 'k + 1 codes' in likelihood
    assert 'one-draw' in likelihood
    assert 'sums those 17 terms exactly and draws the rest' in BitFlipDiffusion.step_kl.__doc__


def test_quick_start_figures_come_from_the_committed_results():
    """The quick-start paragraph's numbers, read again from results/quickstart (results.json, timings.txt)."""
    import json
    res = json.load(open(os.path.join(ROOT, 'results', 'quickstart', 'results.json')))
    lk = res['likelihood']['out-embed-cpu']
    rows = {(r['name'], r['steps']): r for r in res['rows']}
    from model import build_model
    steps = build_model(dict(model_type='embed', vocab_size=10, n_layer=1, n_head=1, n_embd=8, block_size=4,
                             continuous_time=True)).default_steps  # what sample.py draws with when not told
    default = rows[('out-embed-cpu [clamp=True, eta=1.0]', steps)]
    text = rows[('test text', None)]
    start = README.index('The main job takes about')
    para = README[start:README.index('\n\n', start)]
    para = ' '.join(para.split())
    expected = [f"{lk['bits']:.2f} ± {lk['bits_se']:.2f} bits per GPT-2 token ({lk['bits_per_byte']:.2f} bits/byte)",
                f"{lk['context_gain']:.2f} ± {lk['context_gain_se']:.2f} below the unigram line",
                f"({lk['unigram_bits']:.2f})", f"gen-PPL {default['gen_ppl']:.0f}",
                f"({default['gen_bits']:.2f} ± {default['gen_bits_se']:.2f} bits/token)",
                f"{default['gen_ppl'] / text['gen_ppl']:.1f}x held-out text's {text['gen_ppl']:.1f} "
                f"({text['gen_bits']:.2f} ± {text['gen_bits_se']:.2f})",
                f"entropy of {default['entropy']:.2f} bits against the text's {text['entropy']:.2f}",
                f"plain DDIM scores {rows[('out-embed-cpu [clamp=False, eta=0.0]', steps)]['gen_ppl']:,.0f}",
                f"{steps} steps), score gen-PPL"]
    for e in expected:
        assert e in para, e
    ar = json.load(open(os.path.join(ROOT, 'results', 'compact-vs-gpt2', 'results.json')))['likelihood']['out-ar-cpu']
    assert f"scores {ar['bits']:.2f} ± {ar['bits_se']:.2f} exactly" in para
    times = re.findall(r'total ([\d.]+) s', open(os.path.join(ROOT, 'results', 'quickstart', 'timings.txt')).read())
    assert f"three runs: {', '.join(str(round(float(t))) for t in times[:2])} and {round(float(times[2]))} s" in para
