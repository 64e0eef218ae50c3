"""Errors a user can trigger and fix.

The CLI prints a :class:`UnetsegError` as its message alone (no traceback) and exits
non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


class UnetsegError(Exception):
    """An error caused by the user's input, whose message says how to fix it."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one input file: where, what, and how to fix it."""

    path: str
    what: str
    fix: str

    def __str__(self) -> str:
        return f"{self.path}: {self.what}. Fix: {self.fix}"

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "what": self.what, "fix": self.fix}


class InputProblems(UnetsegError):
    """Every problem found in an input, reported together rather than one per run."""

    def __init__(self, problems: list[Problem], header: str = "the input has problems"):
        self.problems = list(problems)
        lines = [f"{header} ({len(self.problems)}):"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))
