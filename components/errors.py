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


class exit_on_user_error:
    """Inside a pipeline task: print a user error as one line and exit non-zero, without a traceback."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None and isinstance(exc, FtloopError):
            import sys

            print(f"ftloop: error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(exc.exit_code) from None
        return False
