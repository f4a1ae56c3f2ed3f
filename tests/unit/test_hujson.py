"""HuJSON parser: JSON compatibility, comments, trailing commas, positions and exact errors."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaymesh.control.hujson import MAX_DEPTH, HuJSONError, Pos, parse, parse_document

FUZZ = int(os.environ.get("RELAYMESH_FUZZ_EXAMPLES", "300"))


def test_plain_json_values() -> None:
    text = '{"a": [1, -2, 3.5, 1e3, -0.25E-2, true, false, null, "x"], "b": {}}'
    assert parse(text) == json.loads(text)


def test_integers_stay_ints_and_floats_floats() -> None:
    value = parse("[1, 1.0, 2e0]")
    assert [type(v) for v in value] == [int, float, float]


def test_line_comments_including_at_end_without_newline() -> None:
    text = '// header\n{\n  "a": 1, // trailing note\n  // own line\n  "b": 2\n} // end'
    assert parse(text) == {"a": 1, "b": 2}


def test_block_comments_anywhere_whitespace_is_allowed() -> None:
    text = '/* a */ {/* b */"a"/* c */:/* d */[/* e */1/* f */,2]/* g */} /* multi\nline */'
    assert parse(text) == {"a": [1, 2]}


def test_trailing_commas_in_objects_and_arrays() -> None:
    assert parse('{"a": [1, 2, 3,], "b": {"c": 1,},}') == {"a": [1, 2, 3], "b": {"c": 1}}


def test_comment_markers_inside_strings_are_text() -> None:
    text = '{"url": "https://example.com/a//b", "c": "/* not a comment */"}'
    assert parse(text) == {"url": "https://example.com/a//b", "c": "/* not a comment */"}


def test_string_escapes() -> None:
    assert parse(r'"q\" b\\ s\/ \b\f\n\r\t"') == 'q" b\\ s/ \b\f\n\r\t'


def test_unicode_escapes_and_surrogate_pairs() -> None:
    assert parse(r'"\u00e9\u4e2d"') == "é中"
    assert parse(r'"\ud83d\ude00"') == "😀"
    assert parse('"raw ünïcödé 😀"') == "raw ünïcödé 😀"


def test_bom_is_ignored() -> None:
    assert parse('\ufeff{"a": 1}') == {"a": 1}


def _err(text: str) -> HuJSONError:
    with pytest.raises(HuJSONError) as info:
        parse(text)
    return info.value


@pytest.mark.parametrize(
    ("text", "line", "column", "reason_part"),
    [
        ('{\n  "a": 1,\n  "b": 2\n  "c": 3\n}', 4, 3, "expected ',' or '}'"),
        ("[1,,2]", 1, 4, "unexpected ','"),
        ("[,]", 1, 2, "unexpected ','"),
        ('{"a": 1,,}', 1, 9, "expected a string key"),
        ("{\n  'a': 1\n}", 2, 3, "expected a string key"),
        ('{"a" 1}', 1, 6, "expected ':'"),
        ('{"a": 1', 1, 8, "unterminated object"),
        ("[1, 2", 1, 6, "unterminated array"),
        ('{\n  "a": "abc', 2, 8, "unterminated string"),
        ("/* never closed", 1, 1, "unterminated /* comment"),
        ('{"a": 1} / ', 1, 10, "unexpected '/'"),
        ('"a\tb"', 1, 3, "raw control character"),
        (r'"\x41"', 1, 2, "invalid escape"),
        (r'"\u12"', 1, 2, "4 hex digits"),
        (r'"\ud83d"', 1, 2, "lone high surrogate"),
        (r'"\ude00"', 1, 2, "lone low surrogate"),
        ("01", 1, 1, "leading zero"),
        ("1.", 1, 3, "after '.'"),
        ("1e+", 1, 4, "exponent"),
        ("-", 1, 2, "expected a digit"),
        ("tru", 1, 1, "expected a value"),
        ("truex", 1, 1, "expected a value"),
        ("NaN", 1, 1, "expected a value"),
        ("", 1, 1, "empty document"),
        ("  // only a comment\n", 2, 1, "empty document"),
        ('{"a": 1} {"b": 2}', 1, 10, "after the top-level value"),
        ('{"a": 1, "a": 2}', 1, 10, "duplicate key 'a'"),
        ('{\n\t"é": x}', 2, 7, "expected a value"),
    ],
)
def test_errors_report_exact_line_and_column(
    text: str, line: int, column: int, reason_part: str
) -> None:
    e = _err(text)
    assert (e.line, e.column) == (line, column), str(e)
    assert reason_part in e.reason
    assert str(e).startswith(f"line {line}, column {column}: ")


def test_columns_count_characters_not_bytes() -> None:
    # "é" is two bytes in UTF-8 but one column; the error is at the 'x' after it.
    e = _err('["é", x]')
    assert (e.line, e.column) == (1, 7)


def test_excessive_nesting_is_an_error_not_a_crash() -> None:
    e = _err("[" * (MAX_DEPTH + 10))
    assert "nesting deeper" in e.reason


def test_positions_side_table() -> None:
    text = '{\n  "acls": [\n    {"src": ["a", "b"]},\n  ],\n  "x": 1,\n}'
    doc = parse_document(text)
    assert doc.pos(()) == Pos(1, 1)
    assert doc.pos(("acls",)) == Pos(2, 11)
    assert doc.key_pos(("acls",)) == Pos(2, 3)
    assert doc.pos(("acls", 0)) == Pos(3, 5)
    assert doc.pos(("acls", 0, "src", 1)) == Pos(3, 19)
    assert doc.key_pos(("x",)) == Pos(5, 3)
    # Unknown paths fall back to the nearest recorded ancestor.
    assert doc.pos(("acls", 0, "src", 7)) == doc.pos(("acls", 0, "src"))


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(json_values)
def test_agrees_with_json_on_json_documents(value: Any) -> None:
    for text in (json.dumps(value), json.dumps(value, indent=2, ensure_ascii=False)):
        assert parse(text) == json.loads(text)


@settings(max_examples=FUZZ)
@given(st.text(max_size=60))
def test_fuzz_arbitrary_text_parses_or_raises_hujsonerror(text: str) -> None:
    try:
        parse(text)
    except HuJSONError as e:
        assert 1 <= e.line <= text.count("\n") + 1
        assert e.column >= 1


@settings(max_examples=FUZZ)
@given(json_values, st.data())
def test_fuzz_mutated_documents_parse_or_raise_hujsonerror(value: Any, data: st.DataObject) -> None:
    text = json.dumps(value, indent=1)
    pos = data.draw(st.integers(min_value=0, max_value=len(text)))
    junk = data.draw(st.sampled_from(["//", "/*", "*/", ",", "\\", '"', "\n", "]", "}", "\\u12"]))
    mutated = text[:pos] + junk + text[pos:]
    try:
        parse(mutated)
    except HuJSONError as e:
        assert e.line >= 1 and e.column >= 1
