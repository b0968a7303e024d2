"""A full or read-only disk is a user's problem with one clear line, and never leaves a half-written artifact."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from ftloop.components.errors import FtloopError

# A full, read-only or forbidden disk is for the user (or the cluster) to fix, not a bug in ftloop.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def _disk_error_reason(exc: BaseException) -> str | None:
    """Why a write failed, when ``exc`` is a failed write rather than a bug; None otherwise.

    A full disk surfaces three ways: OSError (Python writes), safetensors' own error
    with the OS error inside its message (adapter weights), and torch.save's
    RuntimeError from its zip writer, which carries no errno at all (optimizer state).
    """
    if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
        return exc.strerror or os.strerror(exc.errno)
    text = str(exc)
    if type(exc).__name__ == "SafetensorError" and "os error" in text:
        return text.split("I/O error: ", 1)[-1]
    if isinstance(exc, RuntimeError) and ("PytorchStreamWriter" in text or "inline_container" in text):
        first = text.strip().splitlines()[0] if text.strip() else "no details"
        return f"torch.save failed ({first})"
    return None


@contextlib.contextmanager
def _writes_to(location: Path, what: str, hint: str = "") -> Iterator[None]:
    """Turn a failed write under ``location`` into one clear line naming it, how full its disk is, and what to do."""
    try:
        yield
    except Exception as exc:
        reason = _disk_error_reason(exc)
        if reason is None:
            raise
        try:
            free = f"; {shutil.disk_usage(location).free / 2**20:,.1f} MiB free there"
        except OSError:
            free = ""
        raise FtloopError(f"{location}: cannot write {what}: {reason}{free}{hint}") from None


@contextlib.contextmanager
def _removed_on_failure(directory: Path) -> Iterator[None]:
    """On any failure, remove what this block added to ``directory``, so a half-written artifact never looks finished."""
    before = set(directory.iterdir())
    try:
        yield
    except BaseException:
        for entry in set(directory.iterdir()) - before:
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        raise
