"""The one error type the format core raises for bad input."""
from __future__ import annotations


class QbinError(ValueError):
    """A qbin file, or a request about one, is invalid. The message names the file and the fix."""

    def __init__(self, path: object, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
