"""The one error type the commands show as a message instead of a traceback.

Library code raises a subclass (a bad input file, a model that does not fit a probe, an output another process
is writing, ...); `rbrm.cli` prints its message, which names the file, row and field where there is one, and
exits with status 2. `RBRM_DEBUG=1` shows the traceback as well.
"""

from __future__ import annotations

import os
from typing import Any


class RbrmError(Exception):
    """A problem with the user's inputs, settings or files, explained by its message alone."""


class DataError(RbrmError, ValueError):
    """A bad input file; the message names the file, the row (line, csv line or .json element) and the field."""

    def __init__(self, path: Any, line: int | None, field: str | None, message: str, *,
                 element: bool | None = None):
        self.path, self.line, self.field = os.fspath(path), line, field
        if element is None:  # rows of a .json array are numbered by element (0-based), others by line
            element = self.path.removesuffix(".gz").endswith(".json")
        where = self.path
        if line is not None:
            where += f" element {line}" if element else f":{line}"
        super().__init__(f"{where}: " + (f"field {field!r}: " if field else "") + message)


class OutputLockedError(RbrmError):
    """Another process is appending to the same output file; two writers would duplicate its rows."""


class ConfigError(RbrmError, ValueError):
    """A setting or option, or a combination of them, that cannot work; the message names it."""


class AuditError(RbrmError):
    """A run that cannot be audited as asked (no answers, a sample drawn with other settings, labels that match
    nothing); the message says what to do."""
