"""
Run a roadmap experiment end to end: train a list of runs with train.py, score them with evaluate.py (and, for a
temperature grid, sample.py), and write one results directory with results.json, results.md and sweep.png.

    python sweep.py config/sweep_t_values.py
    python sweep.py config/sweep_t_values.py --train_overrides="{'max_iters': 50}" --results_dir=sweep-t-quick

A sweep config names the runs (each a dict of train.py settings with its own out_dir, and optionally its own
base config file under 'config'), the judge, the evaluate.py config and what to tabulate and plot.

Each run is trained by `python train.py <config> --key=value ...` in a subprocess, always saving its checkpoint
at the end, so a run is finished when out_dir/ckpt.pt holds iteration max_iters and the training config it stores
equals the run's in every setting that changes the weights: a finished run is skipped, an unfinished one is resumed
(--init_from=resume; a larger max_iters extends a run), a missing one trained, and one trained with other settings
trained again, with a line naming them (a checkpoint of another model in a run's out_dir is an error). The runs are
then scored together by one `python evaluate.py` (test bits/token with its standard error, samples at each step
count under the judge) into results_dir/eval/<key>, the key naming its inputs (arguments, evaluate config file, the
size and time of each checkpoint file), so an evaluation is reused only while none changed; otherwise a line says
what did. With `temperatures`,
the runs of families that take a temperature are also sampled by sample.py at each temperature (and step count)
and scored with evaluate.py's own metrics. Training curves come from each run's out_dir/eval_log.jsonl.

Table: one row per run (its settings in `columns`, iterations, tokens, training time, test bits/token ± SE,
context gain ± SE), then one row per sample set (steps, temperature, gen-PPL from judge bits ± SE, entropy ± SE,
distinct-n, rep-4). The plot draws the panels named in `panels` (see PANELS). results_dir is checked before any run trains: it
replaces only sweep.py's own results (a results_dir whose results.json sweep.py wrote, known by its keys) unless
overwrite=True (see checkpoint.check_output).
"""

import concurrent.futures
import copy
import functools
import glob
import hashlib
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time

from checkpoint import check_output_dir, save_figure, write_atomic, write_json
from configurator import configure
from loggers import read_eval_log
import system
from system import run_script

# -----------------------------------------------------------------------------------------------------
# config globals; a sweep config (config/sweep_*.py) or --key=value overrides them
runs = []                   # one dict per run: train.py settings, out_dir required; 'config' names its base config
train_config = 'config/embed_cpu.py'  # base train.py config of a run that names none
train_overrides = {}        # train.py settings applied to every run and the judge, after their own (e.g. max_iters)
judge = {}                  # the `ar` run that scores samples (a run dict as above; trained if missing); {}: no judge
run_root = ''               # directory the runs' out_dirs are taken relative to ('' = the current directory)
launcher = ''               # command that starts train.py, e.g. 'torchrun --standalone --nproc_per_node=8'
jobs = 1                    # runs trained at once (each its own process; more than one only where cores or GPUs allow)
results_dir = 'sweep'       # results.json, results.md and sweep.png go here (evaluate.py's own output in eval/<key>/)
overwrite = False           # let results_dir's files replace ones sweep.py did not write (no results.json of its own)
score = True                # score the runs with evaluate.py (likelihood, samples at each step count)
train = True                # False: train nothing; score the runs already finished, listing the others as left out (a
                            # long sweep's results so far, while it trains on)
splits = ['test']           # the splits each run's likelihood is measured on; the tables report 'test', and a 'val'
                            # beside it is what a best checkpoint is chosen on
eval_config = 'config/eval_sweep_common.py'  # evaluate.py config file ('' = its defaults)
eval_overrides = {}         # evaluate.py settings after eval_config (steps, num_samples, ...); not ckpts/judge/out_dir
temperatures = []           # sample.py temperatures for the families that take one (1.0 is evaluate.py's own rows)
columns = []                # train.py settings shown as table columns (the ones the sweep varies)
x = 'T'                     # the train.py setting on the x axis of the 'bits_x' and 'gen_ppl_x' panels
panels = ['bits_tokens', 'bits_seconds', 'gen_ppl_steps', 'entropy_steps']  # what sweep.png draws (see PANELS)
notes = []                  # lines the config adds under the tables (what the sweep does not measure, and why)
paired = 'all'              # paired per-window differences of context gain: 'all' pairs of run groups, 'within' a
                            # family only, or '' none (a group: the runs that differ only in `seed`)
epoch_tokens = 0            # the train split's tokens: > 0 makes the runs budgets of epochs (tokens / epoch_tokens) and
                            # adds the data-reuse tables (convergence(): each family against ar, budget by budget)
retabulate = ''             # a results_dir: make its results.md, sweep.png and results.json's comparisons again
                            # from its results.json by this code's tables, verdicts and panels; nothing is trained or
                            # scored
_config_keys = [k for k, v in list(globals().items()) if not k.startswith('_') and not callable(v)
                and isinstance(v, (bool, int, float, str, list, tuple, dict))]
_DEFAULTS = copy.deepcopy({k: globals()[k] for k in _config_keys})  # main() may run twice in one process (tests)
# -----------------------------------------------------------------------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))


fail = functools.partial(system.fail, 'sweep.py')


RUN_KEYS = ('config', 'branch_from')  # a run's keys that are sweep.py's, not train.py settings


def train_settings(run):
    """A run's full train.py settings (its config file, its own keys, train_overrides) and the argv that sets them."""
    import train
    base = run.get('config', train_config)
    argv = [base] + [f"--{k}={v!r}" if not isinstance(v, str) else f"--{k}={v}"
                     for k, v in {**run, **train_overrides}.items() if k not in RUN_KEYS]
    try:
        s = configure({k: getattr(train, k) for k in train._config_keys}, argv, keys=train._config_keys,
                      verbose=False, prog='train.py')
    except SystemExit as e:
        fail(f"run {run.get('out_dir', run)!r}: {e}")
    return s, argv


def check_config(c):
    """One-line errors for a bad sweep config, before anything runs."""
    if not c['runs']:
        fail("runs is empty: list the runs, e.g. runs = [dict(out_dir='out-a', T=100), dict(out_dir='out-b', T=1000)]")
    for key in ('train_overrides', 'judge', 'eval_overrides'):
        if not isinstance(c[key], dict):
            fail(f"{key}={c[key]!r}: expected a dict of settings")
    bad = [r for r in c['runs'] if not isinstance(r, dict) or not r.get('out_dir')]
    if bad:
        fail(f"run {bad[0]!r}: every run is a dict of train.py settings with its own out_dir")
    if 'out_dir' in c['train_overrides']:
        fail("train_overrides sets out_dir: every run has its own")
    names = [os.path.basename(os.path.normpath(r['out_dir'])) for r in c['runs']]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        fail(f"duplicate out_dir {dup[0]!r}: two runs would share one checkpoint (or one name in the tables)")
    stems = {r['branch_from'] for r in c['runs'] if r.get('branch_from')}
    if stems & {r['out_dir'] for r in c['runs']}:
        fail(f"branch_from={sorted(stems & {r['out_dir'] for r in c['runs']})[0]!r} is also a run's out_dir: a stem "
             f"(the constant-rate run branches cool down from) has an out_dir of its own")
    taken = [k for k in ('ckpts', 'judge', 'out_dir') if k in c['eval_overrides']]
    if taken:
        fail(f"eval_overrides sets {taken[0]}: sweep.py sets ckpts, judge and out_dir itself")
    if c['judge'] and not c['judge'].get('out_dir'):
        fail(f"judge={c['judge']!r} has no out_dir")
    if c['paired'] not in ('all', 'within', ''):
        fail(f"paired={c['paired']!r}: expected 'all', 'within' or ''")
    unknown = [p for p in c['panels'] if p not in PANELS]
    if unknown:
        fail(f"panels: unknown panel {unknown[0]!r}; known: {', '.join(PANELS)}")
    if any(not isinstance(t, (int, float)) or t < 0 for t in c['temperatures']):
        fail(f"temperatures={c['temperatures']!r}: expected non-negative numbers")


def checkpoint_iter(out_dir, settings):
    """(iter_num, train_seconds, stored training config) of out_dir/ckpt.pt (Nones if there is none); fails if it
    holds a different model than asked."""
    import torch
    from checkpoint import refusal
    path = os.path.join(out_dir, 'ckpt.pt')
    if not os.path.isfile(path):
        return None, None, None
    try:
        ckpt = torch.load(path, map_location='cpu', mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - every way a file can fail to be a checkpoint ends in one line
        fail(f"{path} was not loaded: {refusal(e)}")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('model_args'), dict) or 'iter_num' not in ckpt:
        fail(f"{path} is not a checkpoint train.py writes (no model_args and iter_num)")
    differ = {k: v for k, v in ckpt['model_args'].items() if k in settings and settings[k] != v
              and not (k == 'vocab_size' and settings[k] == 0)}  # vocab_size = 0: the data's, whatever it is
    if differ:
        k, v = next(iter(differ.items()))
        fail(f"{path} holds another run's model ({k}={v!r}, the sweep asks {settings[k]!r}): "
             f"give this run a fresh out_dir or delete the old one")
    return ckpt['iter_num'], ckpt.get('train_seconds'), ckpt.get('config')


def training_changes(stored, settings):
    """How a checkpoint's stored training config differs from the run's settings, as 'key=old -> new' strings, in
    every setting that changes the trained weights (train.NOT_TRAINING and the model's, checked by checkpoint_iter,
    aside; and max_iters, which a resumed run extends, with the lr_decay_iters it implies)."""
    import dataclasses
    import train
    from model import ModelConfig
    if not isinstance(stored, dict):
        return ['its checkpoint stores no training config']
    want = dict(settings)
    try:
        train.check_settings(want, 0, 1)  # the derived settings (data_dir, min_lr, dtype ...), as train.py stores them
    except SystemExit as e:
        fail(f"run {settings['out_dir']!r}: {e}")
    skip = {*train.NOT_TRAINING, *(f.name for f in dataclasses.fields(ModelConfig)), 'max_iters',
            *(['lr_decay_iters'] if settings['lr_decay_iters'] < 0 else []),
            *(['gradient_accumulation_steps'] if launcher else [])}  # (rounded to the launcher's ranks)
    # a setting the checkpoint does not store is newer than it: it trained as that setting's default does
    was = {k: stored.get(k, getattr(train, k, '(unset)')) for k in want}
    return [f"{k}={was[k]!r} -> {v!r}" for k, v in want.items() if k not in skip and was[k] != v]


def train_env():
    """The environment of a training subprocess: with jobs > 1 on the CPU, each job gets its share of the cores
    (OMP_NUM_THREADS = cores // jobs), since two jobs of all the cores each run slower than one after the other."""
    env = dict(os.environ)
    if jobs > 1 and 'OMP_NUM_THREADS' not in env:
        env['OMP_NUM_THREADS'] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def train_run(run, log):
    """Train one run to its max_iters (skip when finished, resume when not); returns what the tables need."""
    s, argv = train_settings(run)
    out_dir = s['out_dir']
    done, _, stored = checkpoint_iter(out_dir, s)
    changes = training_changes(stored, s) if done is not None else []
    if changes and run.get('branch_from'):
        stem, point = stem_run(run)
        if done == point and not training_changes(stored, train_settings(stem)[0]):
            changes = []  # the stem's checkpoint at the branch point, copied here: the branch starts from it
    if changes:  # another run's training in this out_dir: neither finished nor to be continued
        log(f"{out_dir}: its checkpoint was trained with other settings ({'; '.join(changes)}): training it again")
        done = None
    if done is not None and done > s['max_iters']:
        fail(f"{out_dir}/ckpt.pt is at iteration {done}, beyond this run's max_iters={s['max_iters']}")
    if done == s['max_iters']:
        status = 'skipped'
        log(f"{out_dir}: finished (iteration {done}), skipped")
    else:
        status = 'retrained' if changes else 'trained' if done is None else 'resumed'
        cmd = [*(shlex.split(launcher) or [sys.executable]), os.path.join(HERE, 'train.py'), *argv,
               '--always_save_checkpoint=True', *(['--init_from=resume'] if done is not None else []),
               *(['--overwrite=True'] if changes else [])]
        log(f"{out_dir}: {'training' if done is None else f'resuming from iteration {done}'}: {shlex.join(cmd)}")
        t0 = time.time()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, env=train_env())
        except OSError as e:
            fail(f"cannot start {cmd[0]!r} (launcher={launcher!r}): {e.strerror or e}")
        if p.returncode:
            fail(f"training {out_dir} failed (exit {p.returncode}):\n{(p.stdout + p.stderr)[-3000:]}")
        log(f"{out_dir}: done in {time.time() - t0:.0f} s")
    iters, seconds, _ = checkpoint_iter(out_dir, s)
    if iters != s['max_iters']:
        fail(f"train.py left {out_dir}/ckpt.pt at iteration {iters}, not max_iters={s['max_iters']}")
    log_path = os.path.join(out_dir, 'eval_log.jsonl')
    curve = read_eval_log(log_path, 'sweep.py') if os.path.exists(log_path) else []
    return {'name': os.path.basename(os.path.normpath(out_dir)), 'out_dir': out_dir, 'status': status,
            'model_type': s['model_type'], 'settings': {k: s[k] for k in columns}, 'iters': iters,
            'tokens': iters * s['batch_size'] * s['block_size'] * s['gradient_accumulation_steps'],
            'train_seconds': seconds, 'curve': curve}


# ---- branches: runs that share the first part of their training (warmup-stable-decay, train.py's lr_schedule='wsd')

def stem_run(run):
    """(stem, branch point) of a branch: a run with branch_from = the out_dir of its stem, the same run with a
    constant learning rate (cooldown_iters = 0) trained to the branch point max_iters - cooldown_iters, from where
    the branch cools down. Every branch of one stem differs from it only in max_iters and cooldown_iters, so the stem
    is one run, trained in stages from one branch point to the next."""
    s, _ = train_settings(run)
    if s['lr_schedule'] != 'wsd' or not s['cooldown_iters']:
        fail(f"run {run['out_dir']!r} has branch_from but lr_schedule={s['lr_schedule']!r}, cooldown_iters="
             f"{s['cooldown_iters']}: a branch is the cooldown of a warmup-stable-decay run (lr_schedule='wsd', "
             f"cooldown_iters > 0)")
    point = s['max_iters'] - s['cooldown_iters']
    stem = {k: v for k, v in run.items() if k != 'branch_from'}
    return {**stem, 'out_dir': run['branch_from'], 'max_iters': point, 'cooldown_iters': 0}, point


def train_stem(stem, branches, log):
    """The stem trained (or extended) to its max_iters, a branch point, and its checkpoint there copied into the
    out_dir of each of its branches that has none yet (atomically: the branch then resumes from it)."""
    todo = [b for b in branches if not os.path.exists(os.path.join(b['out_dir'], 'ckpt.pt'))]
    if not todo:
        return  # every branch from here has started already
    s, _ = train_settings(stem)
    done, _, _ = checkpoint_iter(s['out_dir'], s)
    if done is not None and done > s['max_iters']:
        fail(f"{s['out_dir']}/ckpt.pt is at iteration {done}, past the branch point {s['max_iters']} of "
             f"{todo[0]['out_dir']}, which has no checkpoint: train the stem again (a fresh out_dir) or drop the branch")
    train_run(stem, log)
    for b in todo:
        os.makedirs(b['out_dir'], exist_ok=True)
        write_atomic(os.path.join(b['out_dir'], 'ckpt.pt'),
                     lambda tmp: shutil.copyfile(os.path.join(s['out_dir'], 'ckpt.pt'), tmp))
        log(f"{b['out_dir']}: branched from {s['out_dir']} at iteration {s['max_iters']}")


def training_tasks(todo, log):
    """The trainings, as (key, keys it waits for, function): one per run, and for runs with branch_from one per
    branch point of each stem, in ascending order, each waiting for the one before. Runs keep their order; a stem's
    stages go right before its first branch."""
    stem_of = {i: stem_run(run) for i, run in enumerate(todo) if run.get('branch_from')}  # (stem, point), once each
    stems, tasks = {}, []
    for i in stem_of:
        stems.setdefault(todo[i]['branch_from'], []).append(i)
    for i, run in enumerate(todo):
        after = []
        if i in stem_of:
            branches = stems[run['branch_from']]
            if i == branches[0]:  # the stem's stages, once
                shared = [{k: v for k, v in train_settings(stem_of[j][0])[0].items() if k != 'max_iters'}
                          for j in branches]
                odd = next((j for j, v in zip(branches, shared) if v != shared[0]), None)
                if odd is not None:
                    k = next(k for k in shared[0] if shared[0][k] != shared[branches.index(odd)].get(k))
                    fail(f"runs {run['out_dir']!r} and {todo[odd]['out_dir']!r} branch from "
                         f"{run['branch_from']!r} with different {k}: the branches of one stem differ only in "
                         f"max_iters and cooldown_iters")
                points = sorted({stem_of[j][1] for j in branches})
                for k, p in enumerate(points):
                    at = [j for j in branches if stem_of[j][1] == p]
                    tasks.append((('stem', run['branch_from'], p), [('stem', run['branch_from'], points[k - 1])] if k
                                  else [], functools.partial(train_stem, stem_of[at[0]][0], [todo[j] for j in at], log)))
            after = [('stem', run['branch_from'], stem_of[i][1])]
        tasks.append((('run', i), after, functools.partial(train_run, run, log)))
    return tasks


def run_tasks(tasks, workers):
    """Each task's function, at most `workers` at once, a task starting once those it waits for are done, the
    first ready in list order first. Returns {key: result}; a task that fails (sweep.py's one line) stops it all."""
    results, pending, running = {}, list(tasks), {}
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        while pending or running:
            for task in [t for t in pending if all(k in results for k in t[1])][:max(1, workers) - len(running)]:
                pending.remove(task)
                running[pool.submit(task[2])] = task[0]
            if not running:
                fail(f"task {pending[0][0]} waits for one that is not in the sweep")
            finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for f in finished:
                results[running.pop(f)] = f.result()
    return results


def finished(run):
    """Whether a run's checkpoint is at its max_iters, trained with its settings."""
    s, _ = train_settings(run)
    done, _, stored = checkpoint_iter(s['out_dir'], s)
    return done == s['max_iters'] and not training_changes(stored, s)


def file_identity(path):
    """What tells a file apart from a rewrite of it without reading it: size and modification time."""
    st = os.stat(path)
    return {'size': st.st_size, 'mtime_ns': st.st_mtime_ns}


def score_inputs(argv, ckpts):
    """Everything a score is made from: evaluate.py's arguments, its config file's bytes and each checkpoint file."""
    conf = None
    if eval_config:
        with open(eval_config, 'rb') as f:
            conf = hashlib.sha1(f.read()).hexdigest()
    return {'argv': argv, 'eval_config': conf,
            'checkpoints': {d: file_identity(os.path.join(d, 'ckpt.pt')) for d in ckpts}}


def what_changed(old, new):
    """What differs between two score_inputs, in words."""
    out = [f"{d}/ckpt.pt" for d, v in new['checkpoints'].items() if old['checkpoints'].get(d) not in (None, v)]
    return out + (['the evaluation settings'] if (old['argv'], old['eval_config']) != (new['argv'], new['eval_config'])
                  else [])


def run_evaluate(ckpts, judge_dir, log, split='test'):
    """evaluate.py over the runs, into results_dir/eval/<key of its inputs: arguments, config file, checkpoint
    files>: a fresh directory whenever one changes, reused only when none did (inputs.json there records them).
    The likelihood is on `split` (on another split than test, with one sample per row: its samples are the test
    evaluation's). Returns its results and that directory."""
    argv = ([eval_config] if eval_config else []) + [f"--ckpts={ckpts!r}", f"--judge={judge_dir}"]
    more = {**eval_overrides, **({'split': split, 'num_samples': 1, 'sample_batch_size': 1} if split != 'test' else {})}
    argv += [f"--{k}={v!r}" if not isinstance(v, str) else f"--{k}={v}" for k, v in more.items()]
    inputs = score_inputs(argv, [*ckpts, *([judge_dir] if judge_dir else [])])
    key = hashlib.sha1(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:12]
    out_dir = os.path.join(results_dir, 'eval', key)
    res_path, inputs_path = os.path.join(out_dir, 'results.json'), os.path.join(out_dir, 'inputs.json')
    if os.path.exists(res_path) and os.path.exists(inputs_path) and read_json(inputs_path) == inputs:
        log(f"{res_path}: made from these checkpoints and settings, reused")
    else:
        earlier = sorted(glob.glob(os.path.join(glob.escape(results_dir), 'eval', '*', 'inputs.json')),
                         key=os.path.getmtime)
        if earlier:
            changed = what_changed(read_json(earlier[-1]), inputs) or ['the runs scored']
            log(f"{os.path.dirname(earlier[-1])}: not reused, changed since: {', '.join(changed)}")
        cmd = [sys.executable, os.path.join(HERE, 'evaluate.py'), *argv, f"--out_dir={out_dir}"]
        log(f"scoring: {shlex.join(cmd)}")
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode:
            fail(f"evaluate.py failed (exit {p.returncode}):\n{(p.stdout + p.stderr)[-3000:]}")
        write_json(inputs_path, inputs)
    return read_json(res_path), out_dir


def read_json(path):
    with open(path) as f:
        return json.load(f)


def temperature_rows(rows_in, ev, judge_dir, work, log):
    """Samples of each run whose family takes a temperature, at each temperature and step count, by sample.py;
    scored with evaluate.py's metrics under the judge. Temperature 1.0 is evaluate.py's own rows."""
    import torch
    import evaluate
    from checkpoint import load_checkpoint
    cfg, dev = ev['config'], ev['device']
    judge_model, bos = None, evaluate.prepare.EOT
    if judge_dir:
        judge_model, judge_ckpt = load_checkpoint(judge_dir, device=dev)
        bos = (judge_ckpt.get('meta') or {}).get('eot_token', evaluate.prepare.EOT)  # as evaluate.py reads it
    out = []
    for r in rows_in:
        model = load_checkpoint(r['out_dir'], device='cpu')[0]
        if 'temperature' not in model.sample_options:
            continue
        grid = [None] if model.fixed_steps else [s for s in cfg['steps'] if s <= model.max_steps]
        for t in temperatures:
            for steps in grid:
                if t == 1.0:
                    continue
                path = os.path.join(work, f"{r['name']}-t{t}-s{steps}.jsonl")
                cmd = [sys.executable, os.path.join(HERE, 'sample.py'), f"--out_dir={r['out_dir']}",
                       f"--num_samples={cfg['num_samples']}", f"--batch_size={cfg['sample_batch_size']}",
                       f"--length={ev['sample_length']}", f"--temperature={t}", f"--seed={cfg['seed']}",
                       f"--out_file={path}", f"--device={dev}", f"--dtype={cfg['dtype']}",
                       *([f"--steps={steps}"] if steps is not None else [])]
                if not os.path.exists(path):
                    log(f"sampling: {shlex.join(cmd)}")
                    p = subprocess.run(cmd, capture_output=True, text=True)
                    if p.returncode:
                        fail(f"sample.py failed (exit {p.returncode}):\n{(p.stdout + p.stderr)[-3000:]}")
                samples = torch.tensor([json.loads(line)['tokens'] for line in open(path)])
                row = evaluate.text_metrics(samples, judge_model, cfg['eval_batch_size'], bos)
                out.append({'name': r['name'], 'family': r['model_type'], 'temperature': t,
                            'steps': samples.shape[1] if steps is None else steps, **row})
    return out


# ---- seeds and paired differences

def seed_groups(res):
    """The scored runs grouped by everything but `seed` (label -> runs, in order): one group per setting."""
    groups = {}
    for r in res['runs']:
        if (r.get('likelihood') or {}).get('window_gain'):
            other = [f"{k}={r['settings'][k]}" for k in res['columns'] if k != 'seed']
            groups.setdefault(' '.join([r['model_type'], *other]), []).append(r)
    return groups


def group_stats(runs):
    """A setting's seed-averaged context gain and its errors. With g[s][w] the gain (unigram minus model bits) of
    seed s on test window w: the mean over seeds and windows; se_eval, the standard error over windows of the
    seed-averaged gains (the test windows and the bound's draws); se_draws, the draws' part of it (each run's own,
    evaluate.py's se_draws, independent across runs: sqrt(sum_s se_draws_s^2) / seeds; None for results scored
    without it); seed_sd, the standard deviation of the seeds' mean gains (training noise; it also holds the
    windows' and draws' noise over seeds, so it errs on the large side); and se = sqrt(se_eval^2 + seed_sd^2 /
    seeds), the error of the mean as an estimate of the setting's gain. One seed: no seed_sd, and se counts no
    training noise."""
    lks = [r['likelihood'] for r in runs]
    k = len(lks)
    gw = [sum(col) / k for col in zip(*(lk['window_gain'] for lk in lks))]
    se_eval = statistics.stdev(gw) / math.sqrt(len(gw))
    seed_sd = statistics.stdev([lk['context_gain'] for lk in lks]) if k > 1 else None
    draws = [lk.get('se_draws') for lk in lks]
    return {'runs': [r['name'] for r in runs], 'family': runs[0]['model_type'], 'seeds': k, 'window_gain': gw,
            'bits': statistics.fmean(lk['bits'] for lk in lks), 'seed_bits': [lk['bits'] for lk in lks],
            'gain': statistics.fmean(gw), 'se_eval': se_eval, 'seed_sd': seed_sd,
            'se_draws': None if None in draws else math.sqrt(sum(v ** 2 for v in draws)) / k,
            'se': math.sqrt(se_eval ** 2 + (seed_sd ** 2 / k if k > 1 else 0.0))}


@functools.lru_cache(maxsize=None)  # the tables of one file ask again for the same df
def t_quantile(p, df):
    """The p-quantile (p > 1/2) of Student's t with df >= 1 degrees of freedom (real; inf: the normal's). With
    t = sqrt(df) tan(theta), P(|T| <= t) = 2 c int_0^theta cos(u)^(df - 1) du, c = Gamma((df + 1) / 2) /
    (sqrt(pi) Gamma(df / 2)): that integral by Simpson's rule, theta by Newton's method inside a bisection bracket."""
    if math.isinf(df):
        return statistics.NormalDist().inv_cdf(p)
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(math.pi)

    def central(theta, n=400):
        f = [math.cos(theta * i / n) ** (df - 1) for i in range(n + 1)]
        return 2 * c * theta / (3 * n) * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))
    lo, hi = 0.0, math.pi / 2
    theta = math.atan(statistics.NormalDist().inv_cdf(p) / math.sqrt(df))
    for _ in range(100):
        g = central(theta) - (2 * p - 1)
        if abs(g) < 1e-13:
            break
        lo, hi = (theta, hi) if g < 0 else (lo, theta)
        step = theta - g / (2 * c * math.cos(theta) ** (df - 1))
        theta = step if lo < step < hi else (lo + hi) / 2
    return math.sqrt(df) * math.tan(theta)


def welch(d, paired_var, windows, seeds):
    """Whether |d| exceeds t SE: SE^2 the paired variance (windows - 1 degrees of freedom) plus each seed term
    seed_sd^2 / seeds (seeds - 1), t the two-sided 95% point of Student's t at their Welch-Satterthwaite df,
    SE^4 / sum_i(V_i^2 / df_i). seeds: (seed_sd^2, seeds) of each side that has a spread. Returns
    (resolved, SE, df, t)."""
    terms = [(paired_var, windows - 1), *((v / k, k - 1) for v, k in seeds)]
    var = sum(v for v, _ in terms)
    spread = sum(v * v / k for v, k in terms)
    df = var * var / spread if spread > 0 else math.inf
    t = t_quantile(0.975, df)
    return abs(d) > t * math.sqrt(var), math.sqrt(var), df, t


def paired_difference(a, b):
    """Context gain of a minus b, window by window (the same test windows; ar's are shifted by one token, so
    gains, each against the unigram line on its own tokens, are compared rather than bits), with its standard
    error: the paired one over windows plus each seed spread. Resolved when it exceeds t SE (welch(): with two
    seeds a side a seed term of one df dominates and t is near 3, not 2). A one-seed side has no seed spread
    (one_seed): its SE holds no training noise. `parts` splits SE^2 into what more seeds, bound draws and test
    windows each shrink (draws and windows together for results scored without the draws' part); `needed`, for
    an unresolved difference, the smallest multiple of each alone that would resolve it, the df (and so t)
    following (None: no multiple up to 2^16 would)."""
    dw = [x - y for x, y in zip(a['window_gain'], b['window_gain'])]
    n = len(dw)
    d, se_pair = statistics.fmean(dw), statistics.stdev(dw) / math.sqrt(n)
    seeds = [(g['seed_sd'] ** 2, g['seeds']) for g in (a, b) if g['seed_sd'] is not None]
    resolved, se, df, t = welch(d, se_pair ** 2, n, seeds)
    parts = {'seeds': sum(v / k for v, k in seeds)} if seeds else {}
    if a['se_draws'] is None or b['se_draws'] is None:
        parts['windows with draws'] = se_pair ** 2
    else:  # the runs' draws are independent, so their variances add
        parts['draws'] = a['se_draws'] ** 2 + b['se_draws'] ** 2
        parts['windows'] = max(se_pair ** 2 - parts['draws'], 0.0)
    draws, windows = parts.get('draws', 0.0), se_pair ** 2 - parts.get('draws', 0.0)
    more = {'seeds': lambda f: welch(d, se_pair ** 2, n, [(v, k * f) for v, k in seeds]),
            'draws': lambda f: welch(d, windows + draws / f, n, seeds),
            'windows': lambda f: welch(d, windows / f + draws, n * f, seeds),
            'windows with draws': lambda f: welch(d, se_pair ** 2 / f, n * f, seeds)}

    def smallest(ok):  # the smallest f in 2..2^16 with ok(f), by doubling then bisection
        hi = 2
        while not ok(hi):
            if hi >= 2 ** 16:
                return None
            hi *= 2
        lo = hi // 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if ok(mid) else (mid, hi)
        return hi
    needed = None if resolved else {k: smallest(lambda f: more[k](f)[0]) for k in parts}
    return {'diff': d, 'se_paired': se_pair, 'se': se, 'df': df, 't': t, 'resolved': resolved,
            'one_seed': min(a['seeds'], b['seeds']) == 1, 'parts': parts, 'needed': needed}


def comparisons(res):
    """The seed groups' stats and the paired differences `paired` asks for (the config knob; a results file's own
    setting when it has one)."""
    mode = (res.get('sweep') or {}).get('paired', paired)
    groups = {label: group_stats(rs) for label, rs in seed_groups(res).items()}
    labels = list(groups)
    pairs = [] if not mode else [(a, b) for i, a in enumerate(labels) for b in labels[i + 1:]
                                 if mode == 'all' or groups[a]['family'] == groups[b]['family']]
    out = {'groups': {k: {kk: v for kk, v in g.items() if kk != 'window_gain'} for k, g in groups.items()},
           'pairs': [{'a': a, 'b': b, **paired_difference(groups[a], groups[b])} for a, b in pairs
                     if len(groups[a]['window_gain']) == len(groups[b]['window_gain'])]}
    return out


def verdict(p):
    """A pair's verdict in words: who is better, or what each source of error alone would take to resolve it."""
    if p['resolved']:
        out = f"{p['a'] if p['diff'] > 0 else p['b']} is better"
    else:
        would = ' or '.join(f"~{n}x the {k}" for k, n in p['needed'].items() if n)
        cannot = ' or '.join(k for k, n in p['needed'].items() if not n)
        out = 'not resolved at this budget (' + '; '.join(
            w for w in (would and f"{would} alone would resolve it", cannot and f"more {cannot} alone cannot")
            if w) + ')'
    return out + ('; one seed: no training noise in its SE' if p['one_seed'] else '')


def comparison_markdown(cmp):
    lines = []
    if any(g['seeds'] > 1 for g in cmp['groups'].values()):
        head = ['setting', 'seeds', 'test bits/token: mean (per seed)', 'context gain', 'SE: windows and draws',
                'seed SD', 'SE of the mean']
        lines += ['## Seeds', '', '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
        for label, g in cmp['groups'].items():
            lines.append('| ' + ' | '.join([label, str(g['seeds']), f"{g['bits']:.3f} ("
                                            + ', '.join(f"{b:.3f}" for b in g['seed_bits']) + ')',
                                            f"{g['gain']:+.3f}", num(g['se_eval']), num(g['seed_sd']),
                                            num(g['se'])]) + ' |')
        lines += ['', 'Context gain: unigram minus model bits/token on the same test windows. The SE of the mean '
                  'is sqrt(SE_windows^2 + seed_SD^2 / seeds); with two seeds the seed SD is itself a rough '
                  'estimate (one degree of freedom), which the verdicts below count.', '']
    if cmp['pairs']:
        head = ['A', 'B', 'gain A - B (bits/token)', 'paired SE', 'SE with seed spread', 'df', '(A - B) / SE',
                't (95%)', 'verdict']
        lines += ['## Paired differences', '', '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
        for p in cmp['pairs']:
            spread = num(p['se']) if 'seeds' in p['parts'] else '-'  # neither side has a seed spread to add
            lines.append('| ' + ' | '.join([p['a'], p['b'], f"{p['diff']:+.3f}", num(p['se_paired']), spread,
                                            num(p['df'], '.1f'), f"{p['diff'] / p['se']:+.2f}" if p['se'] else '-',
                                            num(p['t'], '.2f'), verdict(p)]) + ' |')
        lines += ['', 'Window by window over the same test windows; resolved when |A - B| > t SE (the SE with the '
                  'seed spread), t the two-sided 95% point of Student\'s t at the Welch-Satterthwaite df of the '
                  'windows\' term (windows - 1) and each seed spread (seeds - 1). A one-seed setting has no seed '
                  'spread: its SE counts no training noise (\'-\' where neither side has one). Unresolved: how many '
                  'times the seeds, the bound\'s draws or the test windows, each alone, would resolve it (the df and t '
                  'following).', '']
    return lines


# ---- data reuse: each family's budgets against ar's (a sweep with epoch_tokens)

def log_crossing(points, level):
    """The first x at which y (over points (x, y), x ascending) reaches `level`: the first point's x if y is there
    already (the level is reached at or before it), else linear in log x between the two points around the first
    rise through it; None if it never does."""
    if points and points[0][1] >= level:
        return points[0][0]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if y0 < level <= y1:
            return math.exp(math.log(x0) + (level - y0) / (y1 - y0) * (math.log(x1) - math.log(x0)))
    return None


def final_losses(run):
    """{'train_loss', 'val_loss'}: the training objective (nats per token) on train and val windows at the run's last
    iteration, as train.py evaluated it (eval_log.jsonl): where train falls below val, the model has begun to
    memorise its train split. None where the log has no evaluation at that iteration."""
    p = next((p for p in reversed(run.get('curve') or []) if p.get('iter') == run.get('iters')), None)
    if p is None or p.get('train') is None or p.get('val') is None:
        return None
    return {'train_loss': p['train'], 'val_loss': p['val']}


def convergence(res):
    """The data-reuse answer, from runs that are budgets of each family (groups by family and max_iters, seeds
    averaged): per family its budgets (epochs, tokens, training seconds, val and test bits, context gain ± SE); its
    best budget chosen on the val split (lowest val bits, never the test split) and reported on test; that best
    against ar's best, chosen the same way, and at every budget both have, against ar's run of that budget, as the
    paired difference of test context gains with its seed spread (paired_difference); the tokens at which its gain
    first reaches 1, 2 and 3 bits, and at which its test bits first reach ar's best (log-linear between budgets)."""
    epoch = res['sweep']['epoch_tokens']
    fams = {}
    for rs in seed_groups(res).values():
        g = group_stats(rs)
        vals = [(r.get('likelihood_by_split') or {}).get('val') for r in rs]
        losses = [final_losses(r) for r in rs]
        g.update(tokens=rs[0]['tokens'], seconds=statistics.fmean(r['train_seconds'] or 0.0 for r in rs),
                 val=statistics.fmean(v['bits'] for v in vals) if None not in vals else None,
                 **{k: statistics.fmean(l[k] for l in losses) if None not in losses else None
                    for k in ('train_loss', 'val_loss')})
        fams.setdefault(g['family'], []).append(g)
    for gs in fams.values():
        gs.sort(key=lambda g: g['tokens'])

    def best(gs):  # chosen on val (test where a run has no val score: then the table says so)
        chosen = [g for g in gs if g['val'] is not None] or gs
        return min(chosen, key=lambda g: g['val'] if g['val'] is not None else g['bits'])
    out = {'families': {}, 'ar_best': None}
    ar = fams.get('ar')
    ar_best = best(ar) if ar else None
    if ar_best:
        out['ar_best'] = {k: ar_best[k] for k in ('tokens', 'seconds', 'val', 'bits', 'gain', 'se')}
    for fam, gs in fams.items():
        b = best(gs)
        row = {'budgets': [{k: g[k] for k in ('tokens', 'seconds', 'seeds', 'val', 'bits', 'gain', 'se', 'train_loss',
                                              'val_loss')} for g in gs],
               'best': {k: b[k] for k in ('tokens', 'seconds', 'val', 'bits', 'gain', 'se')},
               'gain_tokens': {n: log_crossing([(g['tokens'], g['gain']) for g in gs], n) for n in (1, 2, 3)}}
        if ar and fam != 'ar':
            row['vs_ar_best'] = paired_difference(b, ar_best)
            by_tokens = {g['tokens']: g for g in ar}
            row['vs_ar'] = [{'tokens': g['tokens'], **paired_difference(g, by_tokens[g['tokens']])}
                            for g in gs if g['tokens'] in by_tokens]
            reach = log_crossing([(g['tokens'], -g['bits']) for g in gs], -ar_best['bits'])
            row['match_ar_best'] = None if reach is None else {'tokens': reach, 'multiplier': reach / ar_best['tokens']}
        out['families'][fam] = row
    out['epoch_tokens'] = epoch
    return out


def convergence_markdown(conv):
    epoch = conv['epoch_tokens']

    def ep(tokens):
        return '-' if tokens is None else f"{tokens / epoch:.3g}"

    def reach(tokens, budgets):  # a level held already at the first budget was reached at or before it
        return ep(tokens) if tokens is None or tokens > budgets[0]['tokens'] else f"≤ {ep(tokens)}"
    lines = ['## Convergence: each family by epochs of the train split', '',
             f"An epoch is {epoch:,} tokens. Each row a budget (its model cooled down to that budget); val and test "
             "bits per GPT-2 token (seeds averaged), the context gain on test ± its SE (seeds included), and the "
             "training objective on train and val windows at the budget's last step (train.py's evaluation): a "
             "train loss below the val loss is the model memorising its train split.", '']
    head = ['family', 'epochs', 'tokens', 'train seconds', 'seeds', 'val bits/token', 'test bits/token',
            'context gain ± SE', 'loss on train / val (nats)']
    lines += ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for fam, row in conv['families'].items():
        for g in row['budgets']:
            lines.append('| ' + ' | '.join([fam, ep(g['tokens']), f"{g['tokens']:,}", num(g['seconds'], ',.0f'),
                                            str(g['seeds']), num(g['val']), num(g['bits']),
                                            pm(g['gain'], g['se'], '+.3f'),
                                            '-' if g['train_loss'] is None else
                                            f"{g['train_loss']:.3f} / {g['val_loss']:.3f}"]) + ' |')
    head = ['family', 'best budget (epochs, chosen on val)', 'val bits/token', 'test bits/token', 'context gain ± SE',
            'against ar\'s best: gain difference ± SE', 't (95%)', 'verdict', 'epochs to 1 / 2 / 3 bits of gain',
            "epochs to ar's best test bits (x ar's tokens)"]
    lines += ['', '## Best budgets, chosen on val', '', '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for fam, row in conv['families'].items():
        b, p, m = row['best'], row.get('vs_ar_best'), row.get('match_ar_best', 'ar')
        lines.append('| ' + ' | '.join([
            fam, ep(b['tokens']), num(b['val']), num(b['bits']), pm(b['gain'], b['se'], '+.3f'),
            pm(p['diff'], p['se'], '+.3f') if p else '-', num(p['t'], '.2f') if p else '-',
            verdict({**p, 'a': fam, 'b': 'ar'}) if p else '-',
            ' / '.join(reach(row['gain_tokens'][n], row['budgets']) for n in (1, 2, 3)),
            '-' if m == 'ar' else 'not within its budgets' if m is None else
            f"{reach(m['tokens'], row['budgets'])} ({m['multiplier']:.2g}x)"]) + ' |')
    for fam, row in conv['families'].items():
        if not row.get('vs_ar'):
            continue
        head = ['epochs', f'{fam} - ar: gain difference ± SE', 't (95%)', 'verdict']
        lines += ['', f"## {fam} against ar, budget by budget", '', '| ' + ' | '.join(head) + ' |',
                  '|' + '---|' * len(head)]
        for p in row['vs_ar']:
            lines.append('| ' + ' | '.join([ep(p['tokens']), pm(p['diff'], p['se'], '+.3f'), num(p['t'], '.2f'),
                                            verdict({**p, 'a': fam, 'b': 'ar'})]) + ' |')
    return lines + ['', 'Gain differences are paired over the same test windows, seed spreads included (a positive one: '
                    'the family ahead of ar); "epochs to" reads the budgets log-linearly between the two around the '
                    'level, "≤" where the first budget is at it already, "-" where no budget reaches it.', '']


def summary_table(res):
    """One row per setting (its seeds together): the README's results table, made from results.json alone.
    Samples: the first seed's run at the largest step count, default sampler, beside the test text's."""
    cmp = comparisons(res)
    ref = res.get('reference') or {}
    head = ['setting', 'seeds', 'test bits/token', 'context gain ± SE (seeds included)',
            f"gen-PPL (test text {num(ref.get('gen_ppl'), '.1f')})", f"entropy (test text {num(ref.get('entropy'), '.2f')})",
            'train s/iter']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    by_name = {r['name']: r for r in res['runs']}
    for label, g in cmp['groups'].items():
        first = g['runs'][0]
        rows = [s for s in res['samples'] if s['name'] == first and s.get('temperature', 1.0) == 1.0]
        last = max(rows, key=lambda s: s['steps'] or 0) if rows else {}
        spi = [v for v in (seconds_per_iter(by_name[n]) for n in g['runs']) if v is not None]
        lines.append('| ' + ' | '.join([
            label, str(g['seeds']), f"{g['bits']:.3f}", f"{g['gain']:+.3f} ± {g['se']:.3f}",
            num(last.get('gen_ppl'), ',.0f') + (f" ({last['steps']} steps)" if last.get('steps') and
                                                by_name[first]['model_type'] != 'ar' else ''),
            num(last.get('entropy'), '.2f'), num(statistics.fmean(spi) if spi else None, '.3f')]) + ' |')
    return lines


# ---- tables

def num(v, spec='.3f'):
    return '-' if v is None else format(v, spec)


def seconds_per_iter(run):
    """A run's training seconds per iteration as train.py logged them; None for a run without timings."""
    return run['train_seconds'] / run['iters'] if run['train_seconds'] and run['iters'] else None


def pm(v, se, spec='.3f'):
    return '-' if v is None else f"{v:{spec}} ± {num(se, spec.lstrip('+'))}"


def gen_ppl(row):
    """gen-PPL with the judge's bits/token ± SE it comes from (the PPL is 2 ** bits)."""
    b = row.get('gen_bits')
    return '-' if b is None else f"{2 ** b:.1f} ({b:.3f} ± {num(row.get('gen_bits_se'))} bits)"


def markdown(res):
    cols = res['columns']
    other = [sp for sp in res['sweep'].get('splits', ['test']) if sp != 'test']  # e.g. val, beside test
    head = ['run', 'family', *cols, 'iters', 'tokens', 'train s/iter', *[f'{sp} bits/token' for sp in other],
            'test bits/token', 'context gain (bits)']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    if res.get('unigram'):
        u = res['unigram']
        cells = ['unigram (train split)', '-', *['-' for _ in cols], '-', '-', '-', *['-' for _ in other],
                 f"{u['bits']:.3f} (exact)", '0']
        lines.append('| ' + ' | '.join(cells) + ' |')

    def bits(lk):
        return '-' if not lk else f"{lk['bits']:.3f} (exact)" if lk['exact'] else \
            f"{pm(lk['bits'], lk['bits_se'])} (bound, {lk['mc_samples']} draw/window)"
    for r in res['runs']:
        lk = r.get('likelihood')
        gain = '-' if not lk else pm(lk['context_gain'], lk['context_gain_se'], '+.3f')
        spi = num(seconds_per_iter(r), '.2f')
        lines.append('| ' + ' | '.join([r['name'], r['model_type'], *[str(r['settings'][k]) for k in cols],
                                        str(r['iters']), f"{r['tokens']:,}", spi,
                                        *[bits((r.get('likelihood_by_split') or {}).get(sp)) for sp in other],
                                        bits(lk), gain]) + ' |')
    scored = [f"Scored by the code at `{res['code'] or 'unknown'}` (git describe, as evaluate.py recorded it; a "
              f"reused evaluation keeps the code that made it).", ''] if res['sweep']['score'] else []
    out = scored + ['## Runs', '', *lines]
    cmp = comparison_markdown(comparisons(res))  # by this code's rules, whatever code wrote the file
    if cmp:
        out += [''] + cmp
    if res['sweep'].get('epoch_tokens') and res['sweep']['score']:
        out += [''] + convergence_markdown(convergence(res))
    if res['samples']:
        head = ['run', *cols, 'steps', 'temperature', 'NFE', 'tok/s', 'gen-PPL (judge bits/token ± SE)',
                'entropy ± SE', 'dist-1', 'dist-2', 'dist-3', 'rep-4', 'self-BLEU ± SE']
        lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
        by_name = {r['name']: r for r in res['runs']}
        for s in res['samples']:
            run = by_name.get(s['name'])
            sets = [str(run['settings'][k]) if run else '-' for k in cols]
            lines.append('| ' + ' | '.join([s['name'], *sets, num(s.get('steps'), 'd'), num(s.get('temperature'), 'g'),
                                            num(s.get('nfe'), '.0f'), num(s.get('tokens_per_s'), ',.0f'), gen_ppl(s),
                                            pm(s['entropy'], s.get('entropy_se'), '.2f'), num(s['distinct_1']),
                                            num(s['distinct_2']), num(s['distinct_3']), num(s['rep_4']),
                                            pm(s.get('self_bleu'), s.get('self_bleu_se'))]) + ' |')
        out += ['', f"## Samples ({res['num_samples']} of {res['sample_length']} tokens per row, judge: "
                f"{res['judge'] or 'none'})", '', *lines,
                '', 'dist-n is pooled over the samples of a row and rep-4 averaged over them; evaluate.py reports no '
                'standard error for either.']
    notes_ = res['notes'] + res['skipped']
    return '\n'.join(out + (['', '## Notes', ''] + [f"- {n}" for n in notes_] if notes_ else [])) + '\n'


# ---- plot: each panel draws on one axis

def _curve(ax, res, key, label):
    for r in res['runs']:
        pts = [(p[key], p['val_bits']) for p in r['curve'] if p.get('val_bits') is not None and key in p]
        if pts:
            ax.plot(*zip(*pts), marker='.', label=r['name'])
    if res['runs'] and res['runs'][0]['curve']:
        ax.axhline(res['runs'][0]['curve'][-1]['unigram_bits'], color='gray', ls='--', label='unigram')
    ax.set(xlabel=label, ylabel='val bits/token (bound; exact for ar)', yscale='log')


def _budgets(ax, res, key, label):
    """Each family's budgets (convergence()): test bits ± SE (solid) and val bits (dashed), against epochs or
    training seconds, beside the unigram line."""
    conv = convergence(res)
    for fam, row in conv['families'].items():
        gs = row['budgets']
        xs = [g['tokens'] / conv['epoch_tokens'] if key == 'epochs' else g['seconds'] for g in gs]
        line = ax.errorbar(xs, [g['bits'] for g in gs], [g['se'] for g in gs], marker='o', capsize=2,
                           label=f"{fam} (test)")
        if all(g['val'] is not None for g in gs):
            ax.plot(xs, [g['val'] for g in gs], ls='--', color=line[0].get_color(), label=f"{fam} (val)")
    if res.get('unigram'):
        ax.axhline(res['unigram']['bits'], color='gray', ls=':', label='unigram (test)')
    ax.set(xlabel=label, ylabel='bits/token (bound; exact for ar)', xscale='log')


def _losses(ax, res):
    """Each family's training objective on train (dotted) and val (solid) windows at each budget's last step, against
    epochs: the gap that opens between them is overfitting."""
    conv = convergence(res)
    for fam, row in conv['families'].items():
        gs = [g for g in row['budgets'] if g['train_loss'] is not None]
        if gs:
            xs = [g['tokens'] / conv['epoch_tokens'] for g in gs]
            line, = ax.plot(xs, [g['val_loss'] for g in gs], marker='o', label=f"{fam} (val)")
            ax.plot(xs, [g['train_loss'] for g in gs], ls=':', marker='.', color=line.get_color(), label=f"{fam} (train)")
    ax.set(xlabel='epochs of the train split (each a cooled-down budget)', ylabel='training objective (nats/token)',
           xscale='log')


def _by_steps(ax, res, key, label):
    for name in dict.fromkeys(s['name'] for s in res['samples']):
        pts = sorted((s['steps'], s[key]) for s in res['samples']
                     if s['name'] == name and s.get('temperature', 1.0) == 1.0 and s.get(key) is not None)
        if pts:
            ax.plot(*zip(*pts), marker='o', label=name)
    if res.get('reference') and res['reference'].get(key) is not None:
        ax.axhline(res['reference'][key], color='gray', ls='--', label='test text')
    ax.set(xlabel='sampling steps', ylabel=label, xscale='log', yscale='log' if key == 'gen_ppl' else 'linear')


def _by_x(ax, res, key, label):
    runs_ = [r for r in res['runs'] if x in r['settings']]

    # one line per family and per value of the other columns that vary within the family
    varied = {f: [k for k in res['columns'] if k != x and len({q['settings'].get(k) for q in runs_
                                                               if q['model_type'] == f}) > 1]
              for f in {r['model_type'] for r in runs_}}

    def series(r):
        return ' '.join([r['model_type'], *(f"{k}={r['settings'][k]}" for k in varied[r['model_type']])])
    for fam in dict.fromkeys(series(r) for r in runs_):
        rs = sorted((r for r in runs_ if series(r) == fam), key=lambda r: r['settings'][x])
        if key == 'bits':
            pts = [(r['settings'][x], r['likelihood']['bits'], r['likelihood']['bits_se'] or 0) for r in rs
                   if r.get('likelihood')]
            if pts:
                ax.errorbar(*zip(*pts), marker='o', capsize=3, label=fam)
            continue
        for steps in sorted({s['steps'] for s in res['samples'] if s['name'] in {r['name'] for r in rs}}):
            pts = [(r['settings'][x], s['gen_ppl']) for r in rs for s in res['samples'] if s['name'] == r['name']
                   and s['steps'] == steps and s.get('temperature', 1.0) == 1.0 and s.get('gen_ppl')]
            if pts:
                ax.plot(*zip(*pts), marker='o', label=f"{fam}, {steps} steps")
    ax.set(xlabel=x, ylabel=label, xscale='log', yscale='log' if key == 'gen_ppl' else 'linear')


def _by_position(ax, res):
    for r in res['runs']:
        by_pos = (r.get('likelihood') or {}).get('by_position') or []
        if by_pos:
            mid = [(p['positions'][0] + p['positions'][1] - 1) / 2 for p in by_pos]
            ax.errorbar(mid, [p['bits'] for p in by_pos], [p['bits_se'] or 0 for p in by_pos], marker='o', capsize=3,
                        label=r['name'])
    ax.set(xlabel='position in the window (middle of each range)', ylabel='test bits/token ± SE', xscale='log')


def _frontier(ax, res):
    groups = dict.fromkeys((s['name'], s['steps']) for s in res['samples'])
    for name, steps in groups:
        pts = sorted((s.get('temperature', 1.0), s['entropy'], s['gen_ppl']) for s in res['samples']
                     if s['name'] == name and s['steps'] == steps and s.get('gen_ppl'))
        if pts:
            ax.plot([p[1] for p in pts], [p[2] for p in pts], marker='o', label=f"{name}, {steps} steps")
            for t, e, g in pts:
                ax.annotate(f"T={t:g}", (e, g), fontsize=6)
    ref = res.get('reference') or {}
    if ref.get('gen_ppl'):
        ax.plot([ref['entropy']], [ref['gen_ppl']], 'k*', markersize=10, label='test text')
    ax.set(xlabel='unigram entropy per sample (bits): diversity', ylabel='gen-PPL: lower is better', yscale='log')


def _cost(ax, res, key, cost, label):
    """Sample quality against sampling cost: one line per run and sampler setting across its step counts (ar, whose
    length sets its steps, is a point per temperature), held-out text as a line."""
    families = list(dict.fromkeys(s['family'] for s in res['samples']))
    drawn = {f: 0 for f in families}  # one colour per family, one line style per setting within it
    for name in dict.fromkeys(s['name'] for s in res['samples']):
        rows = [s for s in res['samples'] if s['name'] == name and s.get(key) is not None and s.get('nfe')]
        if not rows:
            continue
        fam = rows[0]['family']
        k, drawn[fam] = drawn[fam], drawn[fam] + 1
        pts = sorted((s['nfe'] if cost == 'nfe' else s['seconds'] / res['num_samples'], s[key]) for s in rows)
        ax.plot(*zip(*pts), marker='os^dv'[k % 5], ls=['-', '--', ':', '-.'][k % 4],
                color=f"C{families.index(fam) % 10}", label=name)
    if res.get('reference') and res['reference'].get(key) is not None:
        ax.axhline(res['reference'][key], color='gray', ls='--', label='test text')
    ax.set(xlabel='network evaluations per sample' if cost == 'nfe' else 'seconds per sample (sampled in batches)',
           ylabel=label, xscale='log', yscale='log' if key == 'gen_ppl' else 'linear')


PANELS = {
    'bits_tokens': lambda ax, res: _curve(ax, res, 'tokens', 'training tokens (equal tokens)'),
    'bits_seconds': lambda ax, res: _curve(ax, res, 'train_seconds', 'training seconds (equal wall-clock)'),
    'gen_ppl_steps': lambda ax, res: _by_steps(ax, res, 'gen_ppl', 'gen-PPL under the judge'),
    'entropy_steps': lambda ax, res: _by_steps(ax, res, 'entropy', 'unigram entropy per sample (bits)'),
    'bits_x': lambda ax, res: _by_x(ax, res, 'bits', 'test bits/token ± SE'),
    'gen_ppl_x': lambda ax, res: _by_x(ax, res, 'gen_ppl', 'gen-PPL under the judge'),
    'frontier': _frontier,
    'gen_ppl_nfe': lambda ax, res: _cost(ax, res, 'gen_ppl', 'nfe', 'gen-PPL under the judge'),
    'gen_ppl_seconds': lambda ax, res: _cost(ax, res, 'gen_ppl', 'seconds', 'gen-PPL under the judge'),
    'entropy_nfe': lambda ax, res: _cost(ax, res, 'entropy', 'nfe', 'unigram entropy per sample (bits)'),
    'bits_position': _by_position,
    'budgets_epochs': lambda ax, res: _budgets(ax, res, 'epochs', 'epochs of the train split (each a cooled-down budget)'),
    'budgets_seconds': lambda ax, res: _budgets(ax, res, 'seconds', 'training seconds'),
    'losses_epochs': _losses,
}


def draw(res, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False)
    for ax, name in zip(axes[0], panels):
        PANELS[name](ax, res)
        ax.set_title(name)
        ax.grid(True, which='both', alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    save_figure(fig, path, os.path.basename(os.path.dirname(os.path.abspath(path))))


# ---- the whole job

def main(argv=None, log=print):
    globals().update(copy.deepcopy(_DEFAULTS))
    c = copy.deepcopy(configure(globals(), argv, keys=_config_keys, prog='sweep.py'))
    globals().update(copy.deepcopy(c))  # the runs are copies: a config's imported lists are never changed
    if retabulate:
        with open(os.path.join(retabulate, 'results.json')) as f:
            res = json.load(f)
        if not res.get('sweep', {}).get('score', True):
            fail(f"{retabulate}/results.json holds no scores to tabulate")
        res['comparisons'] = comparisons(res)
        globals().update({k: copy.deepcopy(v) for k, v in res['sweep'].items()  # its own settings (panels, x):
                          if k in _config_keys and k != 'retabulate'})   # the picture it drew, by today's code
        return write_results(res, retabulate, log)
    check_config(c)
    check_output_dir(results_dir, 'results.json', ['results.md', 'sweep.png'], 'sweep.py', overwrite,
                          what='results_dir')
    if run_root:
        for r in [*runs, *([judge] if judge else [])]:
            r['out_dir'] = os.path.join(run_root, r['out_dir'])
            if r.get('branch_from'):
                r['branch_from'] = os.path.join(run_root, r['branch_from'])
    for r in runs + ([judge] if judge else []):  # every run's settings are checked before the first one trains
        missing = [k for k in columns if k not in train_settings(r)[0]]
        if missing:
            fail(f"columns: {missing[0]!r} is not a train.py setting")
    if {'bits_x', 'gen_ppl_x'} & set(panels) and x not in columns:
        fail(f"x={x!r} must be one of columns={columns!r} (the settings the tables and plot know)")
    res = {'sweep': c, 'columns': columns, 'notes': list(notes), 'skipped': [], 'runs': [], 'samples': [],
           'judge': '', 'num_samples': None, 'sample_length': None, 'code': None}
    if not train:  # only what has finished: the rest is named under the tables
        left = [r for r in runs if not finished(r)]
        res['skipped'] += [f"{r['out_dir']}: not finished yet, left out (train=False)" for r in left]
        runs[:] = [r for r in runs if r not in left]
        if not runs:
            fail("train=False and no run of the sweep has finished: nothing to score")
        if judge and not finished(judge):
            res['skipped'].append(f"{judge['out_dir']} (the judge): not finished yet, so no gen-PPL (train=False)")
            globals()['judge'] = {}
    judge_dir, todo = '', list(runs)
    if judge:
        s, _ = train_settings(judge)
        if s['model_type'] != 'ar':
            fail(f"the judge must be an 'ar' run, not {s['model_type']!r}")
        judge_dir = s['out_dir']
        if judge_dir not in [train_settings(r)[0]['out_dir'] for r in runs]:
            todo.append(judge)  # trained like the runs, not compared with them
        res['judge'] = os.path.basename(os.path.normpath(judge_dir))
    trained = run_tasks(training_tasks(todo, log), jobs)
    done = [trained[('run', i)] for i in range(len(todo))]
    res['runs'], res['judge_run'] = done[:len(runs)], (done[len(runs):] or [None])[0]
    if score:
        ev, ev_dir = run_evaluate([r['out_dir'] for r in res['runs']], judge_dir, log)
        for r in res['runs']:
            r['likelihood'] = ev['likelihood'].get(r['name'])
        res['samples'] = [{**row, 'temperature': (row.get('options') or {}).get('temperature', 1.0)}
                          for row in ev['rows'] if row['family'] != 'data']
        res['reference'] = next((row for row in ev['rows'] if row['family'] == 'data'), None)
        res.update(unigram=ev.get('unigram'), num_samples=ev['num_samples'], sample_length=ev['sample_length'],
                   skipped=res['skipped'] + ev['skipped'], code=ev.get('code'))  # the code that scored, as evaluate.py recorded it
        if temperatures:
            res['samples'] += temperature_rows(res['runs'], ev, judge_dir, os.path.join(ev_dir, 'samples'), log)
        for split in (x for x in splits if x != 'test'):
            other, _ = run_evaluate([r['out_dir'] for r in res['runs']], judge_dir, log, split)
            for r in res['runs']:
                r.setdefault('likelihood_by_split', {})[split] = other['likelihood'].get(r['name'])
        res['comparisons'] = comparisons(res)  # the record; the tables compute them again (comparisons())
    os.makedirs(results_dir, exist_ok=True)
    return write_results(res, results_dir, log)


def write_results(res, directory, log):
    """results.json, results.md and sweep.png (the panels of the sweep's settings) into directory."""
    draw(res, os.path.join(directory, 'sweep.png'))
    write_json(os.path.join(directory, 'results.json'), res)
    md = markdown(res)
    write_atomic(os.path.join(directory, 'results.md'), lambda tmp: open(tmp, 'w').write(md))
    log(md)
    log(f"wrote {directory}/results.json and results.md")
    return res


if __name__ == '__main__':
    run_script(main, 'sweep.py')
