"""
Where train.py's numbers go besides the console: TensorBoard, Weights & Biases and ClearML (each imported only when
asked for, written by rank 0 only), and out_dir/eval_log.jsonl, one JSON line per evaluation (the training curves
sweep.py draws).
"""

import functools
import json
import os
import sys

import system
from checkpoint import write_atomic
from prepare import one_line

fail = functools.partial(system.fail, 'train.py')


class Loggers:
    """TensorBoard, wandb and ClearML (rank 0, each only when asked): the same scalars to each; and, when enabled (the
    process that writes out_dir), out_dir/eval_log.jsonl, a fresh run's empty, a resumed run's cut at its iter_num."""

    def __init__(self, c, iter_num, enabled=True):
        self.writer = self.wandb = self.clearml = None
        self.enabled, self.eval_log = enabled, os.path.join(c['out_dir'], 'eval_log.jsonl')
        if not enabled:
            return
        os.makedirs(c['out_dir'], exist_ok=True)
        restart_eval_log(self.eval_log, c, iter_num)
        if c['tensorboard_log']:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step hides events a killed run logged after its last checkpoint (all of them for a fresh
            # run with overwrite=True: step 0)
            self.writer = SummaryWriter(os.path.join(c['out_dir'], 'tb'), purge_step=iter_num)
        if c['wandb_log']:
            import wandb
            wandb.init(project=c['wandb_project'], name=c['wandb_run_name'], config=c)
            self.wandb = wandb
        if c['clearml_log']:
            try:
                from clearml import Task
            except ImportError:
                fail("clearml_log=True needs the clearml package: pip install -r requirements-optional.txt")
            if c['clearml_offline']:
                Task.set_offline(True)
            # report from a thread, not from the process ClearML forks by default on Linux: a fork of this
            # multi-threaded process (torch's thread pools) hung at Task.close() in about half of the test runs
            Task._report_subprocess_enabled = False
            # ClearML's automatic hooks off: it would otherwise capture the console and upload every torch.save
            self.clearml = Task.init(project_name=c['clearml_project'], task_name=c['clearml_task'],
                                     auto_connect_frameworks=False, auto_connect_arg_parser=False,
                                     auto_connect_streams=False, auto_resource_monitoring=False,
                                     reuse_last_task_id=False)
            self.clearml.connect(dict(c), name='config')  # the config as hyperparameters

    def scalars(self, d, step):
        if self.writer is not None:
            for k, v in d.items():
                self.writer.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(d, step=step)
        if self.clearml is not None:
            for k, v in d.items():  # 'train/loss' -> the plot 'train', series 'loss', as TensorBoard groups it
                title, _, series = k.rpartition('/')
                self.clearml.get_logger().report_scalar(title or k, series, v, iteration=step)

    def evaluation(self, it, losses, tokens, train_seconds, unigram_bits, unigram_bits_per_byte, model_type):
        """An evaluation's scalars (the losses, val bits per token and per byte beside the unigram's) and its line
        of eval_log.jsonl."""
        self.scalars({f'eval/{k}_loss': v for k, v in losses.items() if not k.startswith('val_bits')}, it)
        if 'val_bits' in losses:
            self.scalars({'eval/val_bits_per_token': losses['val_bits'], 'eval/val_bits_se': losses['val_bits_se'],
                          'eval/unigram_bits_per_token': unigram_bits}, it)
        if 'val_bits_per_byte' in losses:
            self.scalars({'eval/val_bits_per_byte': losses['val_bits_per_byte'],
                          'eval/unigram_bits_per_byte': unigram_bits_per_byte}, it)
        if self.enabled:
            append_eval_log(self.eval_log, {'iter': it, 'tokens': tokens, 'train_seconds': train_seconds, **losses,
                                            'unigram_bits': unigram_bits, 'unigram_bits_per_byte': unigram_bits_per_byte,
                                            'model_type': model_type})

    def close(self):
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.clearml is not None:
            self.clearml.close()


def append_eval_log(path, record):
    """One JSON line per evaluation (out_dir/eval_log.jsonl), the data of the convergence curves."""
    try:
        with open(path, 'a') as f:
            f.write(json.dumps(record) + '\n')
    except OSError as e:
        fail(f"cannot write {path}: {one_line(e)} (disk full?)")


def read_eval_log(path, prog='train.py'):
    """The records of an eval_log.jsonl, in order. A partial last line (what a crash in the middle of an append
    leaves) is skipped, with a note on stderr; any other line that is not a JSON object is a one-line error."""
    try:
        with open(path, encoding='utf-8') as f:
            lines = f.read().split('\n')
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"{prog}: cannot read {path}: {one_line(e)}") from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not isinstance(rec.get('iter'), int):
                raise ValueError('no iter')
        except ValueError:
            if n == len(lines):  # no newline after it: an append that did not finish
                print(f"{prog}: note: {path}: skipped its partial last line {n} (a crash in the middle of a write)",
                      file=sys.stderr)
                break
            raise SystemExit(f"{prog}: {path} line {n} is not an evaluation record (a JSON object with an iter): "
                             f"{line[:60]!r}") from None
        records.append(rec)
    return records


def restart_eval_log(path, c, iter_num):
    """A fresh run starts the log empty; a resumed one drops what its killed predecessor logged after the
    checkpoint (and a partial last line). Rewritten atomically: a crash keeps the old log."""
    old = read_eval_log(path) if c['init_from'] == 'resume' and os.path.exists(path) else []
    keep = [json.dumps(r) + '\n' for r in old if r['iter'] <= iter_num]

    def write(tmp):
        with open(tmp, 'w') as f:
            f.writelines(keep)
    try:
        write_atomic(path, write)
    except OSError as e:
        fail(f"cannot write {path}: {one_line(e)}")
