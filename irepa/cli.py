"""Command-line checks shared by the launch/ scripts (they are fire programs).

fire binds the options it knows, runs the command with defaults for the rest (writing its
outputs: a sample batch, a prepared dataset, an analysis table) and only then complains
about leftovers such as a misspelt `--stpes 2`. `run` refuses an unknown command, option
or extra positional value before anything runs, with a "did you mean", then hands the
command line to fire unchanged.
"""
from __future__ import annotations

import difflib
import inspect
import sys
from typing import Callable

from irepa.errors import UserError


class UsageError(UserError, ValueError):
    """A command line that names something wrong; reported before anything is computed or written."""


def _is_number(tok: str) -> bool:
    try:
        float(tok)
    except ValueError:
        return False
    return True


def check_args(argv: list[str], target: Callable | dict[str, Callable]) -> None:
    """Check `argv` against `target`'s signature (or, for a dict of commands, the named command's).

    A function that takes **kwargs accepts any option name (it checks them itself)."""
    if argv and argv[0] in ("-h", "--help", "--"):
        return  # fire's help and flags
    if isinstance(target, dict):
        if not argv or argv[0].startswith("-"):
            return
        cmd, argv = argv[0], argv[1:]
        if cmd not in target:
            close = difflib.get_close_matches(cmd, list(target), 1)
            raise UsageError(f"unknown command {cmd!r}{f' (did you mean {close[0]!r}?)' if close else ''}; "
                             f"commands: {', '.join(target)}")
        fn, where = target[cmd], f"{cmd}: "
    else:
        fn, where = target, ""
    sig = inspect.signature(fn).parameters.values()
    params = [p.name for p in sig if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    any_option = any(p.kind == p.VAR_KEYWORD for p in sig)
    any_positional = any(p.kind == p.VAR_POSITIONAL for p in sig)
    options = ", ".join(f"--{p}" for p in params)
    positional, i = 0, 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            break  # fire's own flags follow (--help, --trace, ...)
        if tok in ("-h", "--help"):
            return
        if tok.startswith("--"):
            name, has_value = tok[2:].split("=", 1)[0].replace("-", "_"), "=" in tok
            if not any_option and name not in params and not (name.startswith("no") and name[2:] in params):
                close = difflib.get_close_matches(name, params, 1)
                raise UsageError(f"{where}unknown option --{name}"
                                 f"{f' (did you mean --{close[0]}?)' if close else ''}; options: {options}")
            # like fire: a following token that is not an option is this option's value
            if not has_value and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                i += 1
        elif tok.startswith("-") and not _is_number(tok):
            short = tok[1:].split("=", 1)[0]
            if len(short) != 1 or [p[0] for p in params].count(short) != 1:  # fire's unique-initial short flags
                raise UsageError(f"{where}unknown option {tok}; options: {options}")
            if "=" not in tok and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                i += 1
        else:
            positional += 1
        i += 1
    if positional > len(params) and not any_positional:
        raise UsageError(f"{where}{positional} positional values for {len(params)} parameters ({options})")


def run(target: Callable | dict[str, Callable], name: str, argv: list[str] | None = None,
        signature: Callable | None = None):
    """check_args, then fire.Fire(target). `signature`: the function whose parameters a wrapper
    `target` really takes. A UsageError or a check's ValueError ends the program with its message."""
    import fire

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        check_args(argv, signature or target)
    except UsageError as e:
        sys.exit(f"{name}: {e}")
    return fire.Fire(target, command=argv, name=name)
