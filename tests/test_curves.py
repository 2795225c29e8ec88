"""Tests of curves.py: the convergence table and picture drawn from train.py's eval_log.jsonl."""
import json
import os

import pytest

import curves


@pytest.mark.slow
def test_curves_table_and_picture_from_the_eval_logs(short_run, tmp_path, capsys):
    """curves.py reads each run's eval_log.jsonl: the table row of the last evaluation carries the bound with its
    standard error where the log has one (an older log without it still draws), and the PNG is written."""
    out_dir, _ = short_run
    old = tmp_path / 'old-run'
    old.mkdir()
    with open(old / 'eval_log.jsonl', 'w') as f:  # a log written before val_bits_se existed
        for it, bits in ((0, 16.5), (10, 12.25)):
            f.write(json.dumps({'iter': it, 'tokens': it * 256, 'train_seconds': it * 0.5, 'val_bits': bits,
                                'unigram_bits': 11.0, 'model_type': 'mask'}) + '\n')
    res = curves.main([f"--runs={[out_dir, str(old)]}", f'--out_dir={tmp_path / "curves"}'])
    table = capsys.readouterr().out
    last = [json.loads(line) for line in open(os.path.join(out_dir, 'eval_log.jsonl'))][-1]
    assert f"| {last['val_bits']:.3f} ± {last['val_bits_se']:.3f} | {last['unigram_bits']:.3f} |" in table, table
    assert "| old-run | mask | 10 | 2,560 | 5 | 12.250 | 11.000 | -1.250 |" in table, table
    assert [len(c['records']) for c in res] == [4, 2]
    assert os.path.getsize(tmp_path / 'curves' / 'curves.png') > 0
    curves.main([f"--runs={[out_dir]}", f'--out_dir={tmp_path / "curves"}'])  # its own curves: rewritten
    # a directory holding a picture curves.py did not write (no curves.json of its own beside it) is refused
    (tmp_path / 'other').mkdir()
    (tmp_path / 'other' / 'curves.png').write_bytes(b'a picture of hours')
    with pytest.raises(SystemExit) as e:
        curves.main([f"--runs={[out_dir]}", f'--out_dir={tmp_path / "other"}'])
    assert str(e.value.code) == (f"curves.py: '{tmp_path}/other/curves.png' (in out_dir='{tmp_path}/other') exists "
                                 f"and is not curves.py's own curves.png; choose another path, or replace it with "
                                 f"--overwrite=True")
    assert (tmp_path / 'other' / 'curves.png').read_bytes() == b'a picture of hours'
