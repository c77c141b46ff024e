"""Faults injected into a trainer through its loader (the production loop has no test hook).

    tr.data.loader = Interrupt(tr.data.loader, 5, crash)   # dies before batch 5 is handed out
"""
from __future__ import annotations


class Interrupt:
    """A trainer's loader, with `action()` run before batch `at` (0-based) is handed out."""

    def __init__(self, loader, at: int, action):
        self.loader, self.at, self.action = loader, at, action

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == self.at:
                self.action()
            yield batch

    def __getattr__(self, name):
        return getattr(self.loader, name)


class Crash(Exception):
    """A process killed mid-step, as a test can catch it."""


def crash():
    raise Crash("killed")
