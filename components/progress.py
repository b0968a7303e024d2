"""The progress callback every stage takes: one console line per call."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str], None]
