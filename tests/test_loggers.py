"""Tests of loggers.py: eval_log.jsonl read back after a crash in the middle of an append, restarted at a resumed
run's iteration, and kept from a fresh run; Loggers' scalars reaching ClearML (offline) as TensorBoard gets them."""
import glob
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, TINY_TRAIN as TINY
from loggers import Loggers, read_eval_log, restart_eval_log


def test_a_partial_last_line_of_eval_log_is_skipped_and_reported(tmp_path, capsys):
    """What a crash in the middle of an append leaves is skipped with a note (a resume and a sweep read on); a
    damaged line inside the log is no crash's, and stops the reader in one line."""
    path = tmp_path / 'eval_log.jsonl'
    path.write_text('{"iter": 0, "val": 9.0}\n{"iter": 10, "val": 8.0}\n{"iter": 20, "va')
    assert [r['iter'] for r in read_eval_log(str(path))] == [0, 10]
    assert 'skipped its partial last line 3' in capsys.readouterr().err
    restart_eval_log(str(path), {'init_from': 'resume'}, 10)  # what a resumed run keeps: whole lines only
    assert path.read_text() == '{"iter": 0, "val": 9.0}\n{"iter": 10, "val": 8.0}\n'
    path.write_text('{"iter": 0}\n{"iter": 1\n{"iter": 2}\n')
    with pytest.raises(SystemExit) as e:
        read_eval_log(str(path), 'sweep.py')
    assert str(e.value.code).startswith(f"sweep.py: {path} line 2 is not an evaluation record"), e.value.code


def test_a_resumed_run_keeps_the_evaluations_up_to_its_checkpoint_and_a_fresh_one_none(tmp_path):
    """A killed run may have logged evaluations after its last checkpoint: the resumed run drops them (it evaluates
    those iterations again), and appends its own after; a fresh run starts the log empty."""
    c = {'out_dir': str(tmp_path), 'init_from': 'resume', 'tensorboard_log': False, 'wandb_log': False,
         'clearml_log': False}
    path = tmp_path / 'eval_log.jsonl'
    path.write_text(''.join(json.dumps({'iter': i, 'val': 9.0 - i}) + '\n' for i in (0, 2, 4, 6)))
    logs = Loggers(c, 4)
    logs.evaluation(6, {'val': 1.5, 'val_bits': 7.0, 'val_bits_se': 0.1}, tokens=60, train_seconds=3.0,
                    unigram_bits=8.7, unigram_bits_per_byte=None, model_type='mask')
    logs.close()
    recs = read_eval_log(str(path))
    assert [r['iter'] for r in recs] == [0, 2, 4, 6] and recs[-1]['val'] == 1.5 and recs[-1]['val_bits_se'] == 0.1
    Loggers({**c, 'init_from': 'scratch'}, 0).close()
    assert path.read_text() == ''
    Loggers({**c, 'init_from': 'scratch', 'out_dir': str(tmp_path / 'other')}, 0, enabled=False).close()
    assert not (tmp_path / 'other').exists()  # a rank that does not write out_dir writes nothing


@pytest.mark.slow
def test_clearml_offline_records_the_tensorboard_scalars_and_the_config(data_dir, tmp_path):
    """ClearML for real, in its offline mode (Task.set_offline(True) via clearml_offline): the session folder it
    writes holds the very scalars TensorBoard got, and the config as hyperparameters."""
    pytest.importorskip('clearml')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out_dir = tmp_path / 'out'
    p = subprocess.run([sys.executable, 'train.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={out_dir}',
                        '--max_iters=4', '--eval_interval=2', '--log_interval=2', '--tensorboard_log=True',
                        '--clearml_log=True', '--clearml_offline=True', '--clearml_task=t1'],
                       cwd=ROOT, capture_output=True, text=True, timeout=200,
                       env={**os.environ, 'HOME': str(tmp_path)})  # ClearML keeps offline sessions in ~/.clearml
    assert p.returncode == 0, p.stdout + p.stderr
    metrics, = glob.glob(str(tmp_path / '.clearml' / 'cache' / 'offline' / '*' / 'metrics.jsonl'))
    session = os.path.dirname(metrics)
    with open(metrics) as f:
        events = [e for line in f if line.strip() for e in json.loads(line)]
    got = {(f"{e['metric']}/{e['variant']}", e['iter']): e['value'] for e in events
           if e['type'] == 'training_stats_scalar'}
    tb = EventAccumulator(str(out_dir / 'tb'))
    tb.Reload()
    want = {(tag, s.step): s.value for tag in tb.Tags()['scalars'] for s in tb.Scalars(tag)}
    assert ('train/loss', 4) in want and set(got) == set(want)
    assert all(got[k] == pytest.approx(want[k], rel=1e-6) for k in want)  # TensorBoard keeps float32
    with open(os.path.join(session, 'task.json')) as f:
        task = json.load(f)
    assert task['name'] == 't1' and task['hyperparams']['config']['learning_rate']['value'] == '0.003'
    assert task['hyperparams']['config']['model_type']['value'] == 'embed'
