"""`--help` and the usage line of the launch scripts, written from their signatures and docstrings.

fire's own help of a wrapped function lists its decorator metadata as a command group
("GROUP is one of: FIRE_METADATA"), shows no help text for most options, goes through a pager
and, for a function taking *args (evaluate.py), ends in a TypeError. irepa.cli prints this
instead: the script's module docstring, its usage line, then every argument and option with
its type, default and help text.

Help text comes from the function's docstring: an entry starts with a parameter's name and a
colon, at the start of a line or after a sentence ("OUT: the output folder. --batch: images
per model call."), and runs to the next entry or the end of its paragraph:

    MODEL: run folder, checkpoint folder or released .pt (a required argument, upper case)
    --batch: images per model call; lines of the
        same paragraph continue the entry.

The rest of the docstring is the function's summary. A parameter without an entry is still
listed, with its type and default.
"""
from __future__ import annotations

import inspect
import re
import textwrap
from typing import Callable

from irepa.coerce import annotations_of, type_name


def parse_docstring(fn: Callable) -> tuple[str, dict[str, str]]:
    """(summary, {parameter name: help text}) from `fn`'s docstring (module doc: the format)."""
    names = [p.name.upper() if p.default is p.empty else f"--{p.name}" for p in _params(fn)]
    if not names:
        return inspect.cleandoc(fn.__doc__ or ""), {}
    marker = re.compile(r"(?:^|\n|(?<=\. ))(" + "|".join(map(re.escape, names)) + r"):\s")
    summary, entries = [], {}
    for para in re.split(r"\n\s*\n", inspect.cleandoc(fn.__doc__ or "")):
        parts = marker.split(para)  # [before, name, text, name, text, ...]
        if parts[0].strip():
            summary.append(parts[0].strip())
        for key, text in zip(parts[1::2], parts[2::2]):
            entries[key.lstrip("-").lower()] = " ".join(text.split())
    return "\n\n".join(summary), entries


def _params(fn: Callable) -> list[inspect.Parameter]:
    return [p for p in inspect.signature(fn).parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def required(fn: Callable) -> list[str]:
    """Names of the parameters without a default (the positional arguments a user must give)."""
    return [p.name for p in _params(fn) if p.default is p.empty]


def usage(fn: Callable, name: str, command: str | None = None) -> str:
    """`name [command] ARG1 ARG2 [options]`."""
    words = [name, *([command] if command else []), *(a.upper() for a in required(fn))]
    if len(_params(fn)) > len(required(fn)):
        words.append("[options]")
    return " ".join(words)


def _declared(p: inspect.Parameter, hints: dict) -> str:
    tp = hints.get(p.name)
    if tp is None and type(p.default) in (bool, int, float):
        tp = type(p.default)
    return f"  ({type_name(tp)})" if tp is not None else ""


def _wrap(text: str) -> str:
    return textwrap.fill(text, 100, initial_indent="      ", subsequent_indent="      ")


def function_help(fn: Callable, name: str, command: str | None = None) -> str:
    """Usage line, summary, then each argument and option with its type, default and help text."""
    summary, entries = parse_docstring(fn)
    hints = annotations_of(fn)
    lines = [f"usage: {usage(fn, name, command)}"]
    if summary:
        lines += ["", summary]
    for title, wanted in (("arguments", True), ("options", False)):
        group = [p for p in _params(fn) if (p.default is p.empty) == wanted]
        if group:
            lines.append(f"\n{title}:")
        for p in group:
            head = p.name.upper() if wanted else f"--{p.name} = {p.default!r}"
            lines.append(f"  {head}{_declared(p, hints)}")
            if p.name in entries:
                lines.append(_wrap(entries[p.name]))
    return "\n".join(lines)


def module_doc(fn: Callable) -> str:
    """The docstring of the module that defines `fn` (a launch script's own description)."""
    return inspect.cleandoc(getattr(fn, "__globals__", {}).get("__doc__") or "")


def script_help(fn: Callable, name: str) -> str:
    doc = module_doc(fn)
    return (doc + "\n\n" if doc else "") + function_help(fn, name)


def commands_help(commands: dict[str, Callable], name: str) -> str:
    """The module docstring and one line per command (its docstring's first line)."""
    first = next(iter(commands.values()))
    doc = module_doc(first)
    width = max(len(c) for c in commands)
    rows = [f"  {c:{width}s}  {parse_docstring(fn)[0].splitlines()[0] if parse_docstring(fn)[0] else ''}".rstrip()
            for c, fn in commands.items()]
    return ((doc + "\n\n") if doc else "") + f"usage: {name} COMMAND [options]\n\ncommands:\n" + "\n".join(rows) + \
        f"\n\n{name} COMMAND --help lists a command's options."
