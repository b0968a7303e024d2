"""User-facing errors.

Anything a user can cause (bad file, bad config, impossible split) raises
``FtloopError``; the CLI prints its message and exits non-zero without a
traceback. Bugs stay ordinary exceptions so they keep their tracebacks.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import ValidationError


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


# ---------------------------------------------------------------- a pydantic ValidationError as one located line

_EXPECTED = {
    "float_type": "a number",
    "int_type": "an integer",
    "string_type": "a string",
    "bool_type": "a boolean",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "list_type": "a list",
    "tuple_type": "a list",
}


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (int, float)):
        return "a number"
    return type(value).__name__


def _dotted(loc: tuple[str | int, ...]) -> str:
    """('models', 'base', 'train', 'accuracy') -> models.base.train.accuracy; list indices as [i]."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def located_error(path: str | Path, exc: ValidationError, kind: str, line: int | None = None) -> InputFileError:
    """The first problem of ``exc`` as one line: ``PATH[:LINE]: field 'a.b[0].c': PROBLEM; not an ftloop KIND``."""
    error = exc.errors(include_url=False)[0]
    loc, kind_of_error, ctx = tuple(error["loc"]), error["type"], error.get("ctx") or {}
    if kind_of_error == "ftloop" and ctx.get("whole"):
        return InputFileError(str(path), str(ctx["problem"]), line)
    if kind_of_error == "ftloop":
        loc, problem = loc + tuple(ctx.get("at", ())), str(ctx["problem"])
    elif kind_of_error == "missing":
        problem = "missing"
    elif kind_of_error in _EXPECTED:
        if not loc:
            shape = "list" if kind_of_error in ("list_type", "tuple_type") else "object"
            return InputFileError(str(path), f"the top level is not a JSON {shape}; not an ftloop {kind}", line)
        problem = f"expected {_EXPECTED[kind_of_error]}, got {json_type(error.get('input'))}"
    else:
        msg = str(error["msg"])
        problem = msg[:1].lower() + msg[1:]
    suffix = f"; not an ftloop {kind}"
    if not loc:
        return InputFileError(str(path), problem + suffix, line)
    return InputFileError(str(path), problem + suffix, line, _dotted(loc))


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
