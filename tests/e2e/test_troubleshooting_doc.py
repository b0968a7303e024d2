"""docs/troubleshooting.md documents every user-facing error message in the source.

A message's fixed text (the longest literal piece of its f-string) must appear in
the doc, so a new or reworded error fails here until its cause and fix are written down.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "troubleshooting.md"
SOURCES = sorted((REPO / "components").rglob("*.py")) + sorted((REPO / "pipelines").rglob("*.py"))
BASE_USER_ERRORS = {"FtloopError", "ConfigError", "InputFileError"}
MIN_FRAGMENT = 12


def user_error_classes() -> set[str]:
    """The base user errors plus every class in the scanned sources that subclasses one (SplitError, GeneratorError, ...)."""
    bases_of: dict[str, set[str]] = {}
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                bases_of[node.name] = {b.id for b in node.bases if isinstance(b, ast.Name)}
    names = set(BASE_USER_ERRORS)
    while True:
        more = {name for name, bases in bases_of.items() if bases & names} - names
        if not more:
            return names
        names |= more


USER_ERRORS = user_error_classes()


def _literal_pieces(node: ast.expr) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return [v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _literal_pieces(node.left) + _literal_pieces(node.right)
    return []


def _message_arg(call: ast.Call, name: str) -> ast.expr | None:
    index = 1 if name == "InputFileError" else 0
    if len(call.args) > index:
        return call.args[index]
    for kw in call.keywords:
        if kw.arg == "message":
            return kw.value
    return None


def user_error_fragments() -> list[tuple[str, str]]:
    """(where, fixed text) for every user-facing error raised in components/ and pipelines/."""
    found = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name)):
                continue
            name = node.exc.func.id
            config_rule = name == "ValueError" and path.name == "config.py"
            if name not in USER_ERRORS and not config_rule:
                continue
            arg = _message_arg(node.exc, name)
            pieces = [p.strip(" :;,.'\"") for p in _literal_pieces(arg)] if arg is not None else []
            pieces = [p for p in pieces if len(p) >= MIN_FRAGMENT]
            if pieces:
                found.append((f"{path.relative_to(REPO)}:{node.lineno}", max(pieces, key=len)))
    return found


FRAGMENTS = user_error_fragments()


def test_the_scan_finds_the_errors():
    assert len(FRAGMENTS) > 40
    assert {"SplitError", "GeneratorError"} <= USER_ERRORS  # subclasses are user errors too


def test_readme_links_the_doc():
    assert "docs/troubleshooting.md" in (REPO / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("where,fragment", FRAGMENTS, ids=[w for w, _ in FRAGMENTS])
def test_error_is_documented(where, fragment):
    doc = DOC.read_text(encoding="utf-8")
    assert fragment in doc, f"{where}: document {fragment!r} in docs/troubleshooting.md (cause and fix)"
