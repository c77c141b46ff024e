"""The error a user causes (a bad option, file, dataset or checkpoint), as opposed to a bug.

Launch scripts print a `UserError` as one line naming what is wrong and where, without a
traceback; any other exception keeps its traceback. Subclass it (or raise it) wherever the
cause is the input, not the code: `irepa.cli.UsageError`, `irepa.train.checkpoint.CheckpointError`.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input: the message names the key, file or value and what was expected."""


class InputError(UserError, ValueError):
    """A file, dataset, model or option value that does not fit what was asked (wrong shape, kind, settings)."""


class InputNotFound(UserError, FileNotFoundError):
    """A file or folder the command names (or a file it needs) that is not there."""


class InputKeyError(UserError, KeyError):
    """An input file that lacks an entry the command needs; prints its message without KeyError's quotes."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""
