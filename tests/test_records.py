import json

import pytest

from ftloop.components.errors import InputFileError
from ftloop.components.records import load_articles, load_questions

from conftest import write_lines

GOOD = {"id": "a1", "text": "Returns are free within 30 days.", "label": "returns"}


def test_articles_load(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", [GOOD, {**GOOD, "id": "a2", "title": "T"}])
    articles = load_articles(path)
    assert [a.id for a in articles] == ["a1", "a2"] and articles[1].title == "T"


@pytest.mark.parametrize(
    "lines, expected",
    [
        ([GOOD, '{"id": "a2", "text": "x", "label": '], "a.jsonl:2: malformed JSON"),
        ([GOOD, {"id": "a2", "text": "Shipping info"}], "a.jsonl:2: field 'label': missing required field"),
        ([{"id": "a2", "text": "   ", "label": "x"}], "a.jsonl:1: field 'text': is empty"),
        ([GOOD, GOOD], "a.jsonl:2: field 'id': duplicate id 'a1' (first seen on line 1)"),
        ([GOOD, "[1, 2]"], "a.jsonl:2: expected a JSON object, got list"),
        ([{**GOOD, "lable": "x"}], "a.jsonl:1: unknown field(s) ['lable']"),
        ([{**GOOD, "label": 3}], "a.jsonl:1: field 'label': must be a string, got int"),
        ([], "a.jsonl: no articles found"),
    ],
)
def test_bad_articles_name_file_line_and_field(tmp_path, lines, expected):
    path = write_lines(tmp_path / "a.jsonl", lines)
    with pytest.raises(InputFileError) as err:
        load_articles(path)
    assert expected in str(err.value)


def test_blank_lines_do_not_shift_line_numbers(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + '{"id": "a2", "text": "", "label": "x"}\n', encoding="utf-8")
    with pytest.raises(InputFileError, match="a.jsonl:3: field 'text'"):
        load_articles(path)


def test_labels_outside_the_configured_set_are_rejected(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", [GOOD])
    with pytest.raises(InputFileError, match="a.jsonl:1: field 'label': label 'returns' is not one of"):
        load_articles(path, labels=["shipping", "payments"])


def test_not_utf8(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"id": "\xff"}\n')
    with pytest.raises(InputFileError, match="not UTF-8"):
        load_articles(path)


def test_questions_csv_each_row_is_its_own_group(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text("text,label\nwhere is my parcel,shipping\ncan I get a refund,returns\n", encoding="utf-8")
    rows = load_questions(path)
    assert [(r.origin, r.group, r.id) for r in rows] == [("imported", "q000002", "q000002"), ("imported", "q000003", "q000003")]


def test_questions_jsonl_keep_given_ids_and_groups(tmp_path):
    path = write_lines(
        tmp_path / "q.jsonl",
        [{"id": "x1", "text": "refund?", "label": "returns", "group": "g1"}, {"text": "parcel?", "label": "shipping"}],
    )
    rows = load_questions(path)
    assert [(r.id, r.group) for r in rows] == [("x1", "g1"), ("q000002", "q000002")]
    assert all(r.origin == "imported" for r in rows)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("question,label\nhi,returns\n", "q.csv:1: header lacks required column(s) ['text']"),
        ("text,label\nhi,returns,extra\n", "q.csv:2: more fields than the header has"),
        ("text,label\n,returns\n", "q.csv:2: field 'text': is empty"),
    ],
)
def test_bad_questions_csv(tmp_path, text, expected):
    path = tmp_path / "q.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputFileError) as err:
        load_questions(path)
    assert expected in str(err.value)


def test_questions_need_a_known_extension(tmp_path):
    path = tmp_path / "q.txt"
    path.write_text("x", encoding="utf-8")
    with pytest.raises(InputFileError, match="must be a .jsonl or .csv"):
        load_questions(path)


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    import os

    from ftloop.components.records import write_json, write_jsonl

    umask = os.umask(0o022)
    try:
        write_jsonl(tmp_path / "a.jsonl", [{"x": 1}])
        write_json(tmp_path / "b.json", {"x": 1})
    finally:
        os.umask(umask)
    for name in ("a.jsonl", "b.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644  # readable by another container user
    assert not list(tmp_path.glob(".*.tmp"))
