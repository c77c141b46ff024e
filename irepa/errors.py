"""The error a user causes (a bad option, file, dataset or checkpoint), as opposed to a bug.

Launch scripts print a `UserError` as one line naming what is wrong and where, without a
traceback; any other exception keeps its traceback. Subclass it (or raise it) wherever the
cause is the input, not the code: `irepa.cli.UsageError`, `irepa.train.checkpoint.CheckpointError`.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input: the message names the key, file or value and what was expected."""
