"""The incremental JSON reader agrees with json.loads (values and error positions) at any chunk size."""

from __future__ import annotations

import io
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sgmodel.data.jsonstream import JSONStream, JSONStreamError, json_error_item

json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(10**30), max_value=10**30),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(st.characters(codec="utf-8"), max_size=8),  # a file holds UTF-8: no lone surrogates
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=15,
)


def stream(doc: str | bytes, chunk: int = 7, name: str = "doc.json") -> JSONStream:
    data = doc.encode() if isinstance(doc, str) else doc
    return JSONStream(io.BytesIO(data), name, chunk)


def outcome_stream(doc: str, chunk: int):
    try:
        return ("ok", list(stream(doc, chunk).iter_array()))
    except JSONStreamError as err:
        return ("error", err.char, err.line, err.column)


def outcome_json(doc: str):
    try:
        return ("ok", json.loads(doc))
    except json.JSONDecodeError as err:
        return ("error", err.pos, err.lineno, err.colno)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(json_values, max_size=6),
    st.sampled_from([1, 2, 3, 5, 16, 1 << 20]),
    st.booleans(),
    st.booleans(),
    st.data(),
)
def test_matches_json_loads_for_valid_and_corrupted_documents(values, chunk, indent, ascii_only, data):
    doc = json.dumps(values, indent=1 if indent else None, ensure_ascii=ascii_only)
    if data.draw(st.booleans()):  # corrupt: drop or insert one character
        i = data.draw(st.integers(0, len(doc)))
        if data.draw(st.booleans()):
            doc = doc[:i] + doc[i + 1 :]
        else:
            doc = doc[:i] + data.draw(st.sampled_from(list('[]{},:"x1 \n'))) + doc[i:]
    if not doc.lstrip().startswith("["):
        return  # iter_array is for top-level arrays; other documents are tested below
    assert outcome_stream(doc, chunk) == outcome_json(doc)


@pytest.mark.parametrize(
    ("doc", "line", "column", "message"),
    [
        ('[1, 2 3]', 1, 7, "Expecting ',' delimiter"),
        ('[\n  {"a": 1},\n  {"a": tru}\n]', 3, 9, "Expecting value"),
        ('[{"a": "unterminated}]', 1, 8, "Unterminated string"),
        ("[1, 2", 1, 6, "Expecting ',' delimiter"),
        ("[1,]", 1, 4, "Expecting value"),
        ("[1] x", 1, 5, "Extra data"),
        ('{"a": 1}', 1, 1, "Expecting '['"),
        ("", 1, 1, "Expecting '['"),
    ],
)
def test_error_names_file_line_and_column(doc, line, column, message):
    with pytest.raises(JSONStreamError) as info:
        list(stream(doc, chunk=3, name="data/graphs.json").iter_array())
    err = info.value
    assert (err.line, err.column) == (line, column)
    assert err.msg.startswith(message)
    assert str(err).startswith(f"data/graphs.json: invalid JSON at line {line} column {column}")


def test_column_counts_across_chunks_on_one_long_line():
    doc = "[" + ", ".join(["1"] * 500) + " 2]"  # the error is at column 1502, many chunks in
    with pytest.raises(JSONStreamError) as info:
        list(stream(doc, chunk=10).iter_array())
    assert (info.value.line, info.value.column, info.value.char) == (1, doc.index(" 2]") + 2, doc.index(" 2]") + 1)


def test_invalid_utf8_is_reported_with_its_byte():
    data = b'["ok", "bad \xff byte"]'
    with pytest.raises(JSONStreamError, match=r"invalid UTF-8 .* near byte 12"):
        list(stream(data, chunk=4).iter_array())


def test_utf8_bom_and_multibyte_characters_split_across_chunks():
    data = "\ufeff".encode() + json.dumps(["é😀ü", {"k": "日本"}], ensure_ascii=False).encode()
    for chunk in (1, 2, 3):
        assert list(stream(data, chunk=chunk).iter_array()) == ["é😀ü", {"k": "日本"}]


def test_reads_lazily():
    """The first element is available after reading about one chunk, not the whole file."""
    element = json.dumps({"objects": ["x"] * 20})
    raw = io.BytesIO(("[" + ",".join([element] * 5000) + "]").encode())
    items = JSONStream(raw, "big.json", chunk_size=4096).iter_array()
    assert next(items) == {"objects": ["x"] * 20}
    assert raw.tell() <= 2 * 4096
    assert sum(1 for _ in items) == 4999


def test_deep_nesting_is_an_error_not_a_crash():
    doc = "[" + "[" * 100_000 + "]" * 100_000 + "]"
    with pytest.raises(JSONStreamError, match="nesting too deep"):
        list(stream(doc, chunk=1 << 20).iter_array())


def test_iter_members_streams_chosen_arrays():
    doc = json.dumps({"info": {"v": 1}, "images": [{"id": 1}, {"id": 2}], "skipped": [1, 2], "categories": [3]})
    out = []
    for key, value in stream(doc, chunk=5).iter_members(stream_keys=("images", "skipped")):
        if key == "images":
            out.append((key, list(value)))
        elif key == "skipped":
            out.append((key, "not consumed"))  # the reader skips the rest itself
        else:
            out.append((key, value))
    assert out == [
        ("info", {"v": 1}),
        ("images", [{"id": 1}, {"id": 2}]),
        ("skipped", "not consumed"),
        ("categories", [3]),
    ]


def test_iter_members_errors():
    with pytest.raises(JSONStreamError, match="Expecting '\\{'"):
        list(stream("[1]").iter_members())
    with pytest.raises(JSONStreamError, match="property name"):
        list(stream('{"a": 1, 2: 3}').iter_members())
    assert list(stream("{}").iter_members()) == []


def test_read_value_for_single_documents():
    assert stream('  {"objects": ["a"]}  ').read_value() == {"objects": ["a"]}
    with pytest.raises(JSONStreamError, match="Extra data"):
        stream('{"a": 1} {"b": 2}').read_value()


def test_json_error_item_names_file_and_position():
    with pytest.raises(JSONStreamError) as info:
        list(stream('[1, 2 3]', name="in.json").iter_array())
    item = json_error_item(info.value)
    assert item.code == "invalid_json" and item.field == "in.json" and item.row_id is None
    assert "line 1 column 7 (char 6)" in str(item) and "2 3" in str(item)
