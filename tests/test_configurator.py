"""Tests of configurator.py: --key=value overrides type-checked against the defaults, config files, and one-line
errors that name the closest known key."""
import pytest

from configurator import configure

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
