"""User-facing errors.

Anything a user can cause (bad file, bad config, impossible split) raises
``FtloopError``; the CLI prints its message and exits non-zero without a
traceback. Bugs stay ordinary exceptions so they keep their tracebacks.
"""

from __future__ import annotations


class FtloopError(Exception):
    """An error the user can fix; the message says where and what."""

    exit_code = 2


class InputFileError(FtloopError):
    """A data file is malformed: names the file and, when known, the line."""

    def __init__(self, path: str, message: str, line: int | None = None, field: str | None = None):
        self.path = str(path)
        self.line = line
        self.field = field
        where = self.path if line is None else f"{self.path}:{line}"
        if field:
            where += f": field '{field}'"
        super().__init__(f"{where}: {message}")


class ConfigError(FtloopError):
    """The run config is invalid: names the file, the key path and, when known, the line."""
