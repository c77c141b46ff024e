"""Command-line checks shared by the launch/ scripts (they are fire programs).

fire binds the options it knows, runs the command with defaults for the rest (writing its
outputs: a sample batch, a prepared dataset, an analysis table) and only then complains
about leftovers such as a misspelt `--stpes 2`. `run` refuses an unknown command, option,
extra positional value or missing argument before anything runs (one line: what is wrong, with
a "did you mean" or the usage line); prints `--help` from the signature and docstring
(irepa.cli_help: the real options with their types, defaults and help text); converts every option
to the type its parameter declares (annotation, or the type of an int/float/bool default:
`--resolution abc` is refused, `--keep_shards false` is False; irepa.coerce); keeps the text
of string options as typed (fire would make `--out 007` the number 7); and prints any
UserError the command raises as one line `script: message`, without a traceback (under
torchrun also into the worker's error file, which torchrun's failure summary shows).
Any other exception keeps its traceback.
"""
from __future__ import annotations

import difflib
import functools
import inspect
import json
import os
import sys
import time
import typing
from typing import Any, Callable

from irepa import cli_help
from irepa.coerce import annotations_of, coerce
from irepa.errors import UserError


class UsageError(UserError, ValueError):
    """A command line that names something wrong; reported before anything is computed or written."""


def _is_number(tok: str) -> bool:
    try:
        float(tok)
    except ValueError:
        return False
    return True


def check_args(argv: list[str], target: Callable | dict[str, Callable], name: str = "") -> None:
    """Check `argv` against `target`'s signature (or, for a dict of commands, the named command's).

    A function that takes **kwargs accepts any option name (it checks them itself). `name`
    (the script) goes into the usage line of a missing-argument error."""
    if argv and argv[0] in ("-h", "--help", "--"):
        return  # help, and fire's flags
    command = None
    if isinstance(target, dict):
        if not argv or argv[0].startswith("-"):
            raise UsageError(f"missing COMMAND; usage: {name} COMMAND [options]; commands: {', '.join(target)}")
        command, argv = argv[0], argv[1:]
        if command not in target:
            close = difflib.get_close_matches(command, list(target), 1)
            raise UsageError(f"unknown command {command!r}{f' (did you mean {close[0]!r}?)' if close else ''}; "
                             f"commands: {', '.join(target)}")
        fn, where = target[command], f"{command}: "
    else:
        fn, where = target, ""
    sig = inspect.signature(fn).parameters.values()
    params = [p.name for p in sig if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    any_option = any(p.kind == p.VAR_KEYWORD for p in sig)
    any_positional = any(p.kind == p.VAR_POSITIONAL for p in sig)
    options = ", ".join(f"--{p}" for p in params)
    hints = annotations_of(fn)
    text_params = {p.name for p in sig if _is_text(_declared_type(p, hints))}
    positional, named, i = 0, set(), 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            break  # fire's own flags follow (--help, --trace, ...)
        if tok in ("-h", "--help"):
            return
        if tok.startswith("--"):
            opt, has_value = tok[2:].split("=", 1)[0].replace("-", "_"), "=" in tok
            if not any_option and opt not in params and not (opt.startswith("no") and opt[2:] in params):
                close = difflib.get_close_matches(opt, params, 1)
                raise UsageError(f"{where}unknown option --{opt}"
                                 f"{f' (did you mean --{close[0]}?)' if close else ''}; options: {options}")
            bare = not has_value and (i + 1 == len(argv) or argv[i + 1].startswith("--"))
            if bare and opt in text_params:  # fire would pass the string 'True'
                raise UsageError(f"{where}--{opt} needs a value")
            named.add(opt)
            # like fire: a following token that is not an option is this option's value
            if not has_value and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                i += 1
        elif tok.startswith("-") and not _is_number(tok):
            short = tok[1:].split("=", 1)[0]
            if len(short) != 1 or [p[0] for p in params].count(short) != 1:  # fire's unique-initial short flags
                raise UsageError(f"{where}unknown option {tok}; options: {options}")
            named.add(next(p for p in params if p[0] == short))
            if "=" not in tok and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                i += 1
        else:
            positional += 1
        i += 1
    if positional > len(params) and not any_positional:
        raise UsageError(f"{where}{positional} positional values for {len(params)} parameters ({options})")
    _check_required(fn, name, command, named, positional)


def _check_required(fn: Callable, name: str, command: str | None, named: set[str], positional: int) -> None:
    """UsageError naming the required arguments that neither a positional value nor --name gives
    (fire would print its usage screen and exit 2, or call the function without them)."""
    unnamed = [p for p in inspect.signature(fn).parameters.values()
               if p.name not in named and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    filled = {p.name for p in unnamed[:positional]}
    missing = [a for a in cli_help.required(fn) if a not in named and a not in filled]
    if missing:
        where, line = f"{command}: " if command else "", cli_help.usage(fn, name, command)
        more = f" ({name}{f' {command}' if command else ''} --help lists them)" if line.endswith("[options]") else ""
        raise UsageError(f"{where}missing {' and '.join(m.upper() for m in missing)}; usage: {line}{more}")


def _declared_type(p: inspect.Parameter, hints: dict[str, Any]) -> Any:
    """A parameter's annotation, else the type of an int / float / bool default, else None (unchecked)."""
    if p.name in hints:
        return hints[p.name]
    if type(p.default) in (bool, int, float):
        return type(p.default)
    return None


def _is_text(tp: Any) -> bool:
    """str or str | None: options whose text fire should not parse."""
    return tp is str or (tp is not None and set(typing.get_args(tp)) == {str, type(None)})


def _text_or_none(text: str) -> str | None:
    return None if text == "None" else text


def typed(fn: Callable, signature: Callable | None = None) -> Callable:
    """`fn` for fire: string options keep their text, every option is converted to its declared type
    (a BadValue naming --option otherwise), a function's **kwargs get the raw text (it converts them itself)."""
    import fire

    sig_fn = signature or fn
    sig = inspect.signature(sig_fn)
    hints = annotations_of(sig_fn)
    types = {p.name: _declared_type(p, hints) for p in sig.parameters.values()
             if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}

    @functools.wraps(fn)
    def typed_fn(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        for name, value in bound.arguments.items():
            tp = types.get(name)
            if tp is not None:
                bound.arguments[name] = coerce(value, tp, f"--{name}")
        return fn(*bound.args, **bound.kwargs)

    raw = {name: (_text_or_none if tp != str else str) for name, tp in types.items() if _is_text(tp)}
    typed_fn = fire.decorators.SetParseFns(**raw)(typed_fn)
    if any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        typed_fn = fire.decorators.SetParseFn(str)(typed_fn)  # the named parameters' types still apply above
    return typed_fn


def exit_with_user_error(script: str, err: BaseException) -> None:
    """End the process over a UserError: `script: message` on stderr (rank 0) and exit status 1.

    Under torchrun every rank also writes the message to its error file, so torchrun's failure
    summary shows it as the failure's "traceback" instead of a link to its docs; the other
    ranks print nothing themselves (N copies of the same line help no one)."""
    msg = f"{script}: {err}"
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        try:
            with open(error_file, "w") as f:
                json.dump({"message": {"message": msg, "extraInfo": {"py_callstack": msg,
                                                                     "timestamp": str(int(time.time()))}}}, f)
        except OSError:
            pass
    if os.environ.get("RANK", "0") == "0" or not error_file:
        print(msg, file=sys.stderr, flush=True)
    sys.exit(1)


def help_text(argv: list[str], target: Callable | dict[str, Callable], name: str) -> str | None:
    """The help `argv` asks for (-h / --help before any `--`), or None. A function that takes
    **kwargs gets --help itself (train.py lists its config keys)."""
    def asks(toks: list[str]) -> bool:
        return any(t in ("-h", "--help") for t in toks[:toks.index("--") if "--" in toks else None])
    if isinstance(target, dict):
        if argv and argv[0] in ("-h", "--help"):
            return cli_help.commands_help(target, name)
        if argv and argv[0] in target and asks(argv[1:]) and not _takes_kwargs(target[argv[0]]):
            return cli_help.function_help(target[argv[0]], name, argv[0])
        return None
    return cli_help.script_help(target, name) if asks(argv) and not _takes_kwargs(target) else None


def _takes_kwargs(fn: Callable) -> bool:
    return any(p.kind == p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())


def call(target: Callable | dict[str, Callable], name: str, argv: list[str], signature: Callable | None = None):
    """--help, or check_args and then fire.Fire on the typed (see `typed`) target; errors propagate
    (in-process use, tests)."""
    import fire

    shown = help_text(argv, signature or target, name)
    if shown is not None:
        print(shown)
        return None
    check_args(argv, signature or target, name)
    command = {k: typed(fn) for k, fn in target.items()} if isinstance(target, dict) else typed(target, signature)
    return fire.Fire(command, command=list(argv), name=name)


def run(target: Callable | dict[str, Callable], name: str, argv: list[str] | None = None,
        signature: Callable | None = None):
    """A launch script's main: `call` with sys.argv. `signature`: the function whose parameters a
    wrapper `target` really takes. A UserError, from the checks or from the command, ends the
    program with `name: message` and exit status 1 (exit_with_user_error); other errors keep
    their tracebacks."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return call(target, name, argv, signature)
    except UserError as e:
        exit_with_user_error(name, e)
