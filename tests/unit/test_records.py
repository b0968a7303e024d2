import json

import pytest

from ftloop.components.errors import InputFileError
from ftloop.components.records import load_articles, load_questions
from tests.fixtures.data import write_lines

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


# ---------------------------------------------------------------- issue 16: input files


def test_a_repeated_csv_column_is_refused(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text("text,label,text\nwhere is my parcel,shipping,oops\n")
    with pytest.raises(InputFileError, match=r"q\.csv:1: header names column 'text' twice \(columns 1 and 3\)"):
        load_questions(path)


@pytest.mark.parametrize("header, column", [("text,label,", 3), (",text,label", 1), ("text, ,label", 2)])
def test_an_unnamed_csv_column_is_refused(tmp_path, header, column):
    path = tmp_path / "q.csv"
    path.write_text(f"\n{header}\nwhere is my parcel,shipping\n")
    with pytest.raises(InputFileError, match=rf"q\.csv:2: header column {column} has no name"):
        load_questions(path)


def test_a_csv_field_past_the_size_limit(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text("text,label\nok then,shipping\n" + "x" * 200_000 + ",returns\n")
    with pytest.raises(InputFileError, match=r"q\.csv:3: a field is longer than 131072 characters"):
        load_questions(path)


@pytest.mark.parametrize("line", ["[" * 100_000 + "]" * 100_000, '{"a":' * 100_000 + "1" + "}" * 100_000])
def test_deeply_nested_jsonl_is_a_one_line_error(tmp_path, line):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + line + "\n")
    with pytest.raises(InputFileError, match=r"a\.jsonl:2: nested too deeply \(limit about \d+ levels\)"):
        load_articles(path)


def test_deeply_nested_json_document(tmp_path):
    from ftloop.components.records import read_json

    path = tmp_path / "config.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InputFileError, match=r"config\.json: not valid JSON: nested too deeply"):
        read_json(path)


def test_utf16_without_a_byte_order_mark_names_the_nul_byte(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes((json.dumps(GOOD) + "\n").encode("utf-16-le"))
    with pytest.raises(InputFileError, match=r"a\.jsonl:1: a NUL byte at column 2: this is not a UTF-8 text file"):
        load_articles(path)


def test_a_nul_byte_later_in_the_file_is_named_with_its_line(tmp_path):
    path = tmp_path / "q.csv"
    path.write_bytes(b"text,label\r\nwhere is it,shipping\r\nok\x00,returns\r\n")
    with pytest.raises(InputFileError, match=r"q\.csv:3: a NUL byte at column 3"):
        load_questions(path)


def test_a_nul_escape_in_a_text_field_is_refused(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", [{**GOOD, "text": "returns\u0000 policy"}])
    with pytest.raises(InputFileError, match=r"a\.jsonl:1: field 'text': contains a NUL character"):
        load_articles(path)


def test_rows_are_validated_on_construction_and_load_examples_names_the_line(tmp_path):
    from ftloop.components.records import Example, load_examples, write_jsonl

    good = Example("q1", "where is my parcel", "shipping", "g1", "imported")
    for bad in ({"round": "1"}, {"origin": "typed"}, {"id": 3}):
        with pytest.raises(ValueError):
            Example(**{**good.to_dict(), **bad})
    path = tmp_path / "train.jsonl"
    write_jsonl(path, [good.to_dict(), {**good.to_dict(), "round": "1"}])
    with pytest.raises(InputFileError) as err:
        load_examples(path)
    assert str(err.value) == f"{path}:2: field 'round': expected an integer, got a string; not an ftloop examples file"
    write_jsonl(path, [good.to_dict()])
    assert load_examples(path) == [good]
