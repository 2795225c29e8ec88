"""
nanoGPT-style configuration overrides, made safe. Used by train.py, sample.py, evaluate.py, bench.py and sweep.py
(whose sweep configs set train.py's settings through it too).

A script keeps its settings as plain module-level globals with defaults, then calls

    from configurator import configure
    config = configure(globals())            # reads sys.argv[1:]

and the command line may then say

    python train.py config/embed_cpu.py --batch_size=32 --device=cpu --compile=True

API
  configure(namespace, argv=None, keys=None, verbose=True, prog=None) -> dict
    namespace: the dict holding the settings (a script passes globals()); updated in place.
    argv:      the arguments to apply, in order (default sys.argv[1:]). An argument without a leading '--'
               is a config file; '--key=value' is an override; '--help' / '-h' lists the keys and exits.
    keys:      the names that are settings (default: every name in namespace that does not start with '_'
               and whose value is a bool, int, float, str, list, tuple or None; modules, functions and
               classes never count). Pass it when a script has other globals of those types.
    verbose:   print each config file and override as it is applied (pass False on non-zero DDP ranks).
    prog:      the script's name in messages (default: basename of sys.argv[0]).
    Returns {key: value} for every setting, after the overrides (a copy, safe to store in a checkpoint).

Rules
  - A config file is exec'd in a scratch namespace that starts with the current settings (so a file may read
    them, e.g. `lr_decay_iters = max_iters`). Every new top-level name it binds must be a known key; names
    starting with '_', modules, functions and classes are ignored (so `import math` is fine).
  - '--key=value' is parsed with ast.literal_eval; a value that is not a Python literal stays a string
    (`--device=cuda`). For a str setting the raw text is always taken as the string (`--out_dir=2024`).
  - Types are checked against the default: an int is accepted (and converted) where a float is expected;
    a bool must be True or False; a list or tuple setting accepts either (converted to the default's type);
    a setting whose default is None accepts any literal.
  - Any error (unknown key, wrong type, missing file, a config file that raises) exits with one line naming
    the file or argument, the key, the value and what was expected; an unknown key names the closest known key.
    Errors are raised as SystemExit(message), so the exit status is 1 and no traceback is printed.
  - Settings derived from others (lr_decay_iters following max_iters, dtype 'auto', ...) are the calling
    script's business, computed after configure() returns.
"""

import ast
import difflib
import os
import sys
import types

_SIMPLE_TYPES = (bool, int, float, str, list, tuple, type(None))


def _is_setting(name, value):
    return not name.startswith('_') and isinstance(value, _SIMPLE_TYPES)


def _is_ignored(name, value):
    # things a config file may bind without them being settings: private names and imported/defined helpers
    return (name.startswith('_') or isinstance(value, types.ModuleType) or isinstance(value, type)
            or callable(value))


def _unknown(prog, where, key, keys):
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; run `python {prog} --help` to list the keys"
    return SystemExit(f"{prog}: {where}: unknown config key '{key}'{hint}")


def check_type(prog, where, key, value, default):
    """Return value converted to the default's type, or raise SystemExit naming what was expected."""
    if default is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise SystemExit(f"{prog}: {where}: {key}={value!r} has type {type(value).__name__}; "
                         f"expected a bool (write True or False)")
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise SystemExit(f"{prog}: {where}: {key}={value!r} has type {type(value).__name__}; expected a float")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise SystemExit(f"{prog}: {where}: {key}={value!r} has type {type(value).__name__}; expected an int")
    if isinstance(default, (list, tuple)):
        if isinstance(value, (list, tuple)):
            return type(default)(value)
        raise SystemExit(f"{prog}: {where}: {key}={value!r} has type {type(value).__name__}; "
                         f"expected a {type(default).__name__}")
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        raise SystemExit(f"{prog}: {where}: {key}={value!r} has type {type(value).__name__}; expected a str")
    return value


def _parse_value(text, default):
    if isinstance(default, str):
        # a str setting takes the text as is, unless it is a quoted Python string literal
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return text
        return value if isinstance(value, str) else text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text  # a bare word stays a string; the type check then says what was expected


def _print_help(prog, namespace, keys):
    print(f"usage: python {prog} [config/FILE.py ...] [--key=value ...]")
    print("config keys and their current values:")
    for k in keys:
        print(f"  --{k}={namespace[k]!r}")


def configure(namespace, argv=None, keys=None, verbose=True, prog=None):
    prog = prog or os.path.basename(sys.argv[0] or 'script')
    argv = sys.argv[1:] if argv is None else list(argv)
    if keys is None:
        keys = [k for k, v in namespace.items() if _is_setting(k, v)]
    else:
        keys = list(keys)
        missing = [k for k in keys if k not in namespace]
        if missing:
            raise SystemExit(f"{prog}: configure(): keys {missing} are not defined in the namespace")
    known = set(keys)

    for arg in argv:
        if arg in ('-h', '--help'):
            _print_help(prog, namespace, keys)
            raise SystemExit(0)
        if not arg.startswith('--'):
            # a config file: exec it in a scratch namespace seeded with the current settings
            if not os.path.isfile(arg):
                raise SystemExit(f"{prog}: config file '{arg}' not found (arguments without '--' are config files; "
                                 f"overrides are written --key=value)")
            with open(arg) as f:
                source = f.read()
            scratch = {k: namespace[k] for k in keys}
            try:
                exec(compile(source, arg, 'exec'), scratch)
            except SystemExit:
                raise
            except BaseException as e:  # noqa: BLE001 - any failure inside the file is reported the same way
                raise SystemExit(f"{prog}: config file '{arg}' raised {type(e).__name__}: {e}")
            if verbose:
                print(f"{prog}: config file {arg}")
            for k, v in scratch.items():
                if k in known:
                    if v is namespace[k]:
                        continue
                    v = check_type(prog, f"config file '{arg}'", k, v, namespace[k])
                    if verbose and v != namespace[k]:
                        print(f"  {k} = {v!r}")
                    namespace[k] = v
                elif not _is_ignored(k, v):
                    raise _unknown(prog, f"config file '{arg}'", k, keys)
        else:
            key, eq, text = arg[2:].partition('=')
            if not eq:
                raise SystemExit(f"{prog}: argument '{arg}' has no '='; overrides are written --key=value")
            if key not in known:
                raise _unknown(prog, f"argument '{arg}'", key, keys)
            value = check_type(prog, f"argument '{arg}'", key, _parse_value(text, namespace[key]), namespace[key])
            if verbose:
                print(f"{prog}: override {key} = {value!r}")
            namespace[key] = value
    return {k: namespace[k] for k in keys}
