"""Data contracts (JSONL, one object per line) and their loaders.

Loaders validate every line and report the file and line of the first
problems, because users hand-edit these files.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, field
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, ValidationError
from pydantic.dataclasses import dataclass

from ftloop.components.errors import FtloopError, InputFileError, located_error

Origin = Literal["generated", "rephrased", "imported"]
SPLITS = ("train", "dev", "test")
MAX_ERRORS_SHOWN = 5

# Rows are pydantic dataclasses: every construction (a loader's, a generator's, ``dataclasses.replace``) is
# validated, strictly (no "3" for a round, no 3 for an id); the loaders check user files by hand first, for
# their messages (a number id becomes a string there), so pydantic's errors are left for a stage's bad row.
_ROW_CONFIG = ConfigDict(strict=True)


@dataclass(frozen=True, config=_ROW_CONFIG)
class Article:
    id: str
    text: str
    label: str
    title: str | None = None


@dataclass(frozen=True, config=_ROW_CONFIG)
class Example:
    id: str
    text: str
    label: str
    group: str
    origin: Origin
    parent_id: str | None = None
    generator: str | None = None
    round: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> Example:
        return cls(**{k: row[k] for k in cls.__dataclass_fields__ if k in row})


# ---------------------------------------------------------------- JSONL I/O


def decode_text(path: str | Path, data: bytes) -> str:
    """UTF-8 text, without the byte-order mark Excel and Notepad put first; a bad byte is named with its line."""
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0

    def line_and_column(at: int) -> tuple[int, int]:
        before = data[:at].replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        return before.count(b"\n") + 1, len(before) - before.rfind(b"\n")

    try:
        text = data[start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        at = start + exc.start
        line, column = line_and_column(at)
        raise InputFileError(str(path), f"not UTF-8 text: byte 0x{data[at]:02x} at column {column}; save the file as UTF-8", line) from None
    if "\0" in text:  # valid UTF-8, but no text file has one: UTF-16 without a byte-order mark, or a binary file
        line, column = line_and_column(data.index(b"\0"))
        raise InputFileError(
            str(path), f"a NUL byte at column {column}: this is not a UTF-8 text file (UTF-16, or binary?); save the file as UTF-8", line
        )
    return text


def read_text(path: str | Path) -> str:
    """A user's text file (see ``decode_text``); errors name the file."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise InputFileError(str(path), "file not found") from None
    except OSError as exc:
        raise InputFileError(str(path), f"cannot read: {exc.strerror or exc}") from None
    return decode_text(path, data)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file of objects; errors name the file and line."""
    path = Path(path)
    rows: list[dict[str, Any]] = []
    # Universal newlines, as open() reads text: line numbers count the lines an editor shows.
    for lineno, line in enumerate(io.StringIO(read_text(path), newline=None), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputFileError(str(path), f"malformed JSON: {exc.msg} (column {exc.colno})", lineno) from None
        except RecursionError:  # the parser recurses once per [ or {: 100,000 of them is a RecursionError
            raise InputFileError(
                str(path),
                f"nested too deeply (limit about {sys.getrecursionlimit()} levels); a row is one flat JSON object of text fields",
                lineno,
            ) from None
        if not isinstance(row, dict):
            raise InputFileError(str(path), f"expected a JSON object, got {type(row).__name__}", lineno)
        row["__line__"] = lineno
        rows.append(row)
    return rows


def _atomic_temp(path: Path) -> tuple[int, str]:
    """A temp file beside ``path`` with the permissions a plain open() would give (mkstemp uses 0600)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise _write_error(path, exc) from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return fd, tmp


def _write_error(path: Path, exc: OSError) -> FtloopError:
    """Disk full, permission denied, read-only file system: a condition of the output location the user can fix."""
    return FtloopError(f"{path}: cannot write: {exc.strerror or exc}")


def read_json(path: str | Path) -> Any:
    """Read one JSON document; errors name the file and line."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputFileError(str(path), "file not found") from None
    except json.JSONDecodeError as exc:
        raise InputFileError(str(path), f"not valid JSON: {exc.msg}", exc.lineno) from None
    except RecursionError:
        raise InputFileError(str(path), f"not valid JSON: nested too deeply (limit about {sys.getrecursionlimit()} levels)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError(str(path), f"cannot read: {exc}") from None


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write atomically: a crash never leaves a half-written file that looks complete."""
    path = Path(path)
    fd, tmp = _atomic_temp(path)
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
                count += 1
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _write_error(path, exc) from None
        raise
    return count


def write_text(path: str | Path, text: str) -> None:
    """Write atomically, like write_jsonl."""
    path = Path(path)
    fd, tmp = _atomic_temp(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _write_error(path, exc) from None
        raise


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def content_hash(paths: Iterable[str | Path]) -> str:
    """sha256 over file contents, in the given order; artifacts carry it for lineage."""
    digest = hashlib.sha256()
    for p in paths:
        digest.update(Path(p).name.encode())
        digest.update(Path(p).read_bytes())
    return digest.hexdigest()


# ---------------------------------------------------------------- validation helpers


def _require_text(path: str, row: dict, key: str, lineno: int | None, *, optional: bool = False) -> str | None:
    if key not in row or row[key] is None:
        if optional:
            return None
        raise InputFileError(path, "missing required field", lineno, key)
    value = row[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and key in ("id", "group"):
        value = str(value)
    if not isinstance(value, str):
        raise InputFileError(path, f"must be a string, got {type(value).__name__}", lineno, key)
    if "\0" in value:  # a JSON \u0000 escape: no tokenizer or KFP parameter takes it, and nobody types one
        raise InputFileError(path, "contains a NUL character (\\u0000); remove it", lineno, key)
    value = value.strip()
    if not value:
        if optional:
            return None
        raise InputFileError(path, "is empty", lineno, key)
    return value


def _check_labels(path: str, items: list[tuple[str, int | None]], allowed: list[str] | None) -> None:
    if allowed is None:
        return
    allowed_set = set(allowed)
    for label, lineno in items:
        if label not in allowed_set:
            raise InputFileError(path, f"label '{label}' is not one of the configured labels {sorted(allowed_set)}", lineno, "label")


def _check_unique_ids(path: str, items: list[tuple[str, int | None]]) -> None:
    seen: dict[str, int | None] = {}
    for ident, lineno in items:
        if ident in seen:
            raise InputFileError(path, f"duplicate id '{ident}' (first seen on line {seen[ident]})", lineno, "id")
        seen[ident] = lineno


# ---------------------------------------------------------------- loaders


def load_articles(path: str | Path, labels: list[str] | None = None) -> list[Article]:
    """Load labeled articles: JSONL with id, text, label and optional title."""
    path_s = str(path)
    if not path_s.endswith(".jsonl"):
        raise InputFileError(path_s, "articles must be a .jsonl file (one JSON object per line)")
    articles: list[Article] = []
    line_numbers: list[int] = []
    for row in read_jsonl(path):
        lineno = row.pop("__line__")
        unknown = set(row) - {"id", "text", "label", "title"}
        if unknown:
            raise InputFileError(path_s, f"unknown field(s) {sorted(unknown)}; expected id, text, label, title", lineno)
        articles.append(
            Article(
                id=_require_text(path_s, row, "id", lineno),
                text=_require_text(path_s, row, "text", lineno),
                label=_require_text(path_s, row, "label", lineno),
                title=_require_text(path_s, row, "title", lineno, optional=True),
            )
        )
        line_numbers.append(lineno)
    if not articles:
        raise InputFileError(path_s, "no articles found (the file is empty)")
    _check_unique_ids(path_s, [(a.id, n) for a, n in zip(articles, line_numbers)])
    _check_labels(path_s, [(a.label, n) for a, n in zip(articles, line_numbers)], labels)
    return articles


def load_questions(path: str | Path, labels: list[str] | None = None, *, keep_lines: bool = False) -> list[Example]:
    """Load an existing labeled-questions file (JSONL or CSV: text,label[,id][,group]).

    ``keep_lines``: each row's ``meta`` keeps ``{"line": n}`` (its line in the file) for later messages.
    """
    path_s = str(path)
    if path_s.endswith(".jsonl"):
        raw = read_jsonl(path)
    elif path_s.endswith(".csv"):
        raw = _read_csv(path_s)
    else:
        raise InputFileError(path_s, "labeled questions must be a .jsonl or .csv file")
    examples = []
    for row in raw:
        lineno = row.pop("__line__")
        unknown = set(row) - {"id", "text", "label", "group"}
        if unknown:
            raise InputFileError(path_s, f"unknown field(s) {sorted(unknown)}; expected text, label, id, group", lineno)
        text = _require_text(path_s, row, "text", lineno)
        label = _require_text(path_s, row, "label", lineno)
        ident = _require_text(path_s, row, "id", lineno, optional=True) or f"q{lineno:06d}"
        group = _require_text(path_s, row, "group", lineno, optional=True) or ident
        examples.append(Example(id=ident, text=text, label=label, group=group, origin="imported", meta={"line": lineno}))
    if not examples:
        raise InputFileError(path_s, "no labeled questions found (the file is empty)")
    _check_unique_ids(path_s, [(e.id, e.meta["line"]) for e in examples])
    _check_labels(path_s, [(e.label, e.meta["line"]) for e in examples], labels)
    return examples if keep_lines else [Example(**{**e.to_dict(), "meta": {}}) for e in examples]


def _csv_error(path: str, exc: csv.Error, start: int, end: int) -> InputFileError:
    """Name the row where a broken quote starts, not where the parser noticed it (often the end of the file)."""
    reason = str(exc)
    if reason == "unexpected end of data":
        return InputFileError(
            path,
            'unterminated quoted field: the quote opened in this row is never closed; close it (write a quote inside a field as "")',
            start,
        )
    if reason.endswith("expected after '\"'"):
        if end > start:
            return InputFileError(
                path,
                f"unterminated quoted field: the quote opened in this row runs on to line {end}, "
                'where text follows its closing quote; close it (write a quote inside a field as "")',
                start,
            )
        return InputFileError(path, 'text after a closing quote; quote the whole field and write a quote inside it as ""', start)
    if reason.startswith("field larger than field limit"):
        return InputFileError(
            path,
            f"a field is longer than {csv.field_size_limit()} characters; a question is a line "
            "of text, not a document (or a quote opened in this row is never closed)",
            start,
        )
    return InputFileError(path, f"malformed CSV: {reason}", start)


def _read_csv(path: str) -> list[dict[str, Any]]:
    # strict: a quote that is never closed, or text after a closing quote, is an error at the row that
    # starts it, instead of the rest of the file silently becoming one field.
    reader = csv.reader(io.StringIO(read_text(path), newline=""), strict=True)
    header: list[str] | None = None
    rows = []
    while True:
        start = reader.line_num + 1  # a quoted field may span lines: rows are named by their first line
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise _csv_error(path, exc, start, reader.line_num) from None
        if not record:
            continue  # a blank line
        if header is None:
            header = [h.strip() for h in record]
            for column, name in enumerate(header, start=1):
                if not name:
                    raise InputFileError(
                        path,
                        f"header column {column} has no name; name it or delete the column (a trailing comma adds an empty one)",
                        start,
                    )
                if header.index(name) + 1 != column:
                    raise InputFileError(
                        path,
                        f"header names column '{name}' twice (columns {header.index(name) + 1} "
                        f"and {column}); the second would silently replace the first",
                        start,
                    )
            missing = {"text", "label"} - set(header)
            if missing:
                raise InputFileError(path, f"header lacks required column(s) {sorted(missing)}", start)
            continue
        if len(record) > len(header):
            raise InputFileError(path, "more fields than the header has", start)
        clean: dict[str, Any] = dict(zip(header, record))
        if not any(v.strip() for v in clean.values()):
            continue
        clean["__line__"] = start
        rows.append(clean)
    if header is None:
        raise InputFileError(path, "no header row; expected columns text,label[,id][,group]", 1)
    return rows


def load_examples(path: str | Path) -> list[Example]:
    """Load examples written by an earlier stage, each validated as an ``Example``; a bad row is a located error."""
    examples = []
    for row in read_jsonl(path):
        line = row.pop("__line__")
        try:
            examples.append(Example.from_dict(row))
        except ValidationError as exc:
            raise located_error(path, exc, "examples file", line) from None
    return examples


def label_counts(examples: Iterable[Example]) -> dict[str, int]:
    return dict(sorted(Counter(e.label for e in examples).items()))
