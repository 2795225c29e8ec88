"""The README keeps its promises: every command in its shell blocks names scripts, config files and --keys that
exist, and the quick start, training and sampling blocks run as written in a fresh copy of the repository, each
command with tiny-size overrides appended (so the whole walk takes about a minute on two cores).

Not run, only checked: commands that need the network (the Hugging Face hub, GPT-2 Large), GPUs or several
machines, the long runs of the results section, and `tensorboard` (a server; its log directory is checked)."""
import importlib
import json
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
TINY_EVALUATE = ['--steps=[2]', '--num_samples=2', '--sample_batch_size=2', '--max_windows=4', '--mc_samples=1',
                 '--device=cpu', '--plot=False']
MAIN_JOB = [['python', 'prepare.py', '--input=corpus/tinystories', '--vocab=compact'],
            ['python', 'train.py', 'config/embed_cpu.py'],
            ['python', 'sample.py', '--out_dir=out-embed-cpu']]


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


def fresh_clone(parent):
    """A copy of the repository's files as git lists them (tracked and not ignored: what a clone of them holds) in
    parent/x, with nothing beside it; no data, no outputs."""
    git = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard'], cwd=ROOT,
                         capture_output=True, text=True)
    files = git.stdout.split() if git.returncode == 0 else [  # not a git checkout: the sources, configs and corpus
        os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(ROOT) for f in fs
        if os.path.relpath(d, ROOT).split(os.sep)[0] in ('.', 'config', 'tests', 'corpus', 'results')]
    root = parent / 'x'
    for f in files:
        if not f.startswith('data/') and os.path.isfile(os.path.join(ROOT, f)):
            os.makedirs(os.path.dirname(os.path.join(root, f)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), os.path.join(root, f))
    assert os.listdir(parent) == ['x']  # nothing beside the clone: no sibling directory to lean on
    return root


@pytest.fixture(scope='module')
def clone(tmp_path_factory):
    """Fresh clones, each alone in an empty temporary directory. Returns (clones, run): clones[name] is the clone of
    that name, made on first use; run(cmd, name) runs one README command there, with the tiny overrides appended."""
    clones = {}
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}

    def run(cmd, name):
        if name not in clones:
            clones[name] = fresh_clone(tmp_path_factory.mktemp(f'clone_{name}'))
        script, _ = script_and_args(cmd)
        extra = {'train.py': TINY_TRAIN, 'sample.py': TINY_SAMPLE, 'evaluate.py': TINY_EVALUATE}.get(script, [])
        argv = ([sys.executable] + cmd[1:] if cmd[0] == 'python' else
                [sys.executable, '-m', 'torch.distributed.run'] + cmd[1:])
        p = subprocess.run(argv + extra, cwd=clones[name], capture_output=True, text=True, timeout=600, env=env)
        assert p.returncode == 0, f"README command failed: {shlex.join(cmd)}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
        return p.stdout
    return clones, run


def runnable(cmd):
    """Commands the walk runs: this repo's scripts on CPU-sized configs (no GPU, no network, no second machine)."""
    script, args = script_and_args(cmd)
    if script == 'prepare.py' and not any(a.startswith('--input=') for a in args):
        return False  # streams from the Hugging Face hub
    return script is not None and not any(a.endswith(('_gpu.py', '_tinystories.py')) or a.startswith('--nnodes')
                                          for a in cmd)


@pytest.mark.slow
def test_quick_start_then_sampling_run_as_written(clone):
    clones, run = clone
    quick = BLOCKS['Diffusion language models, nanoGPT style']  # set up, then the main job (and the test command)
    assert [c for c in quick if runnable(c)] == MAIN_JOB and quick[0][0] == 'python3'  # the rest: install, tests
    done = []
    for cmd in [c for c in quick if runnable(c)] + BLOCKS['Sampling: `sample.py`']:
        if cmd not in done:  # the sampling block starts with the quick start's last command
            run(cmd, 'a')
            done.append(cmd)
    assert len(done) == 6
    out = clones['a'] / 'out-embed-cpu'
    assert (out / 'ckpt.pt').is_file() and (out / 'trajectory.png').is_file() and (out / 'samples.jsonl').is_file()
    # everything the commands wrote is covered by .gitignore: a user's checkout shows no untracked outputs
    copied = set(subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard'], cwd=ROOT,
                                capture_output=True, text=True).stdout.split())
    written = [os.path.relpath(os.path.join(d, f), clones['a']) for d, _, fs in os.walk(clones['a']) for f in fs]
    written = [f for f in written if f not in copied and '__pycache__' not in f]
    assert written and 'out-embed-cpu/samples.jsonl' in written
    check = subprocess.run(['git', 'check-ignore', '--no-index', '--verbose', '--non-matching', *written], cwd=ROOT,
                           capture_output=True, text=True)
    assert not [line for line in check.stdout.splitlines() if line.startswith('::')], check.stdout


@pytest.mark.slow
def test_training_block_runs_as_written(clone):
    clones, run = clone
    run(MAIN_JOB[0], 'b')  # a second clone, with data
    block = BLOCKS['Training: `train.py`']
    done = []
    for cmd in block:
        if runnable(cmd):
            run(cmd, 'b')
            done.append(cmd)
        elif cmd[0] == 'tensorboard':
            assert (clones['b'] / cmd[cmd.index('--logdir') + 1]).is_dir(), cmd
    assert ['torchrun', '--standalone', '--nproc_per_node=2', 'train.py', 'config/ar_cpu.py', '--device=cpu'] in done
    assert len(block) - len(done) == 2  # all but the GPU run and tensorboard (GUIDE.md has the multi-node ones)


@pytest.mark.slow
def test_next_steps_run_as_written(clone):
    """The commands after the quick start: the other families, all five on one yardstick, the user's own text.
    The GPU configs and the hub's TinyStories are checked by name only (test_every_command_names_...)."""
    clones, run = clone
    for cmd in MAIN_JOB[:2]:
        run(cmd, 'c')
    from conftest import tinystories_documents
    with open(clones['c'] / 'their.txt', 'w', encoding='utf-8') as f:  # the user's own text, in the documented form
        f.write('\n<|endoftext|>\n'.join(tinystories_documents(limit=300)) + '\n')
    block = BLOCKS['Next steps']
    done = [cmd for cmd in block if runnable(cmd)]
    for cmd in done:
        run(cmd, 'c')
    assert [c[1] for c in done[:4]] == ['train.py'] * 4
    assert [c[2] for c in done[:4]] == [f'config/{f}_cpu.py' for f in ('bits', 'analog', 'mask', 'ar')]
    assert [c[1] for c in done[4:]] == ['evaluate.py', 'prepare.py', 'train.py']
    res = json.loads((clones['c'] / 'eval' / 'results.json').read_text())
    assert sorted(res['likelihood']) == sorted(f'out-{f}-cpu' for f in ('embed', 'bits', 'analog', 'mask', 'ar'))
    assert (clones['c'] / 'out-their' / 'ckpt.pt').is_file()
    assert json.loads((clones['c'] / 'data' / 'their_compact' / 'meta.json').read_text())['source'] == \
        {'input': 'their.txt'}
    assert len(block) - len(done) == 3  # the hub's TinyStories, and the GPU runs


def test_no_file_names_a_path_outside_the_repository():
    """The project runs from a clone with nothing beside it: no tracked file points at a sibling directory."""
    outside = '..' + '/shared'  # spelled in two parts, so that this file does not name it either
    git = subprocess.run(['git', 'grep', '-n', '-F', outside], cwd=ROOT, capture_output=True, text=True)
    if git.returncode == 128:
        pytest.skip('not a git checkout')
    assert git.returncode == 1 and not git.stdout, git.stdout  # 1: no match


def test_every_config_file_the_docs_and_the_code_name_exists():
    """A config named anywhere, in a command or in prose, in the documents or in the code's comments, is in config/."""
    named = set()
    for d, _, files in os.walk(ROOT):
        if os.path.relpath(d, ROOT).split(os.sep)[0] in ('.', 'config', 'tests'):
            for f in files:
                if f.endswith(('.py', '.md')) and not f.startswith('ISSUE'):
                    with open(os.path.join(d, f), encoding='utf-8') as fh:
                        named |= set(re.findall(r'config/([a-z]\w*\.py)', fh.read()))  # (not config/FILE.py)
    missing = sorted(n for n in named if not os.path.isfile(os.path.join(ROOT, 'config', n)))
    assert len(named) >= 20 and not missing, missing


def test_the_layout_table_is_the_house_and_every_module_has_its_test_file():
    """The README's layout table names every top-level module (no more than twelve) and nothing that is not there; each
    module has its tests in tests/test_<module>.py, and every test file but the documents' and the GPU's is a
    module's."""
    layout = README[README.index('## Layout'):]
    listed = set(re.findall(r'^\| `(\w+\.py)` \|', layout, flags=re.M))
    modules = {f for f in os.listdir(ROOT) if f.endswith('.py')}
    assert listed == modules and len(modules) <= 12, (listed ^ modules, len(modules))
    tests = {f for f in os.listdir(os.path.join(ROOT, 'tests')) if f.startswith('test_') and f.endswith('.py')}
    assert {f'test_{m}' for m in modules} | {'test_readme.py', 'test_docs.py', 'test_gpu.py'} == tests


def test_families_table_says_how_the_bits_bound_is_computed():
    """The `bits` row's likelihood cell describes BitFlipDiffusion.step_kl: a KL over the joint k-bit code, exact on
    the posterior's mode and its k one-flip neighbours plus a one-draw estimate of the rest (not per-bit KLs)."""
    from diffusion import BitFlipDiffusion
    row = next(line for line in README.splitlines() if line.startswith("| `bits` | the token id's k bits"))
    likelihood = row.strip('| ').split(' | ')[-1]
    assert 'per-bit' not in likelihood and 'joint k-bit code' in likelihood and 'k + 1 codes' in likelihood
    assert 'one-draw' in likelihood
    assert 'sums those 17 terms exactly and draws the rest' in BitFlipDiffusion.step_kl.__doc__


def quick_start_table():
    """The README's table of the main job's figures, made from the committed files it names."""
    def load(*path):
        with open(os.path.join(ROOT, 'results', *path), encoding='utf-8') as f:
            return f.read() if path[-1].endswith('.txt') else json.loads(f.read())
    res = load('quickstart', 'results.json')
    lk = res['likelihood']['out-embed-cpu']
    rows = {(r['name'], r['steps']): r for r in res['rows']}
    from model import build_model
    steps = build_model(dict(model_type='embed', vocab_size=10, n_layer=1, n_head=1, n_embd=8, block_size=4,
                             continuous_time=True)).default_steps  # what sample.py draws with when not told
    default, ddim = rows[('out-embed-cpu [clamp=True, eta=1.0]', steps)], rows[('out-embed-cpu [clamp=False, eta=0.0]', steps)]
    text = rows[('test text', None)]
    ar = load('compact-vs-gpt2', 'results.json')['likelihood']['out-ar-cpu']
    times = [round(float(t)) for t in re.findall(r'total ([\d.]+) s', load('quickstart', 'timings.txt'))]
    q, c, t = '`results/quickstart/results.json`', '`results/compact-vs-gpt2/results.json`', \
        '`results/quickstart/timings.txt`'
    n = res['num_samples']
    return '\n'.join([
        '| figure | value ± standard error | from |',
        '| --- | --- | --- |',
        f"| test bits per GPT-2 token (`embed`'s bound, {lk['mc_samples']} draws a window) | "
        f"{lk['bits']:.2f} ± {lk['bits_se']:.2f} | {q} |",
        f"| the same per UTF-8 byte | {lk['bits_per_byte']:.3f} ± {lk['bits_per_byte_se']:.3f} | {q} |",
        f"| unigram line of the same windows | {lk['unigram_bits']:.2f} | {q} |",
        f"| context gain (unigram line minus bound, paired by window) | "
        f"{lk['context_gain']:.2f} ± {lk['context_gain_se']:.2f} | {q} |",
        f"| `ar` baseline (`config/ar_cpu.py`, 4,000 steps), exact bits per GPT-2 token | "
        f"{ar['bits']:.2f} ± {ar['bits_se']:.2f} | {c} |",
        f"| gen-PPL of {n} samples, default sampler ({steps} steps), `ar` judge | {default['gen_ppl']:.0f} "
        f"({default['gen_bits']:.2f} ± {default['gen_bits_se']:.2f} bits/token) | {q} |",
        f"| gen-PPL of held-out test text, same judge | {text['gen_ppl']:.1f} "
        f"({text['gen_bits']:.2f} ± {text['gen_bits_se']:.2f} bits/token) | {q} |",
        f"| gen-PPL of plain DDIM (no clamping, eta 0, {steps} steps) | {ddim['gen_ppl']:,.0f} "
        f"({ddim['gen_bits']:.2f} ± {ddim['gen_bits_se']:.2f} bits/token) | {q} |",
        f"| unigram entropy of the samples / of the text, bits | {default['entropy']:.2f} ± "
        f"{default['entropy_se']:.2f} / {text['entropy']:.2f} ± {text['entropy_se']:.2f} | {q} |",
        f"| the main job's wall-clock ({len(times)} run{'s' * (len(times) > 1)}) | {', '.join(f'{x} s' for x in times)} | {t} |"])


def test_quick_start_figures_come_from_the_committed_results():
    """The table after the quick start, made again from results/quickstart (results.json, timings.txt) and
    results/compact-vs-gpt2; the "about N minutes" the quick start states is the timed runs' mean, rounded."""
    assert quick_start_table() in README
    times = [float(t) for t in re.findall(r'total ([\d.]+) s',
                                          open(os.path.join(ROOT, 'results', 'quickstart', 'timings.txt')).read())]
    assert times and f"The main job takes about {round(sum(times) / len(times) / 60)} minutes on 2 cores" in README
    steps = int(re.search(r'^max_iters = (\d+)', open(os.path.join(ROOT, 'config', 'embed_cpu.py')).read(), re.M)[1])
    assert f"for {steps:,} steps of 8 x 64 tokens" in ' '.join(README.split())  # what the main job trains
