import json

import pytest

from glm_portable.data.formats import Columns, detect_format, to_example
from glm_portable.data.reader import BadRow, Record, read_records
from glm_portable.errors import UserError


def _messages(row, fmt, columns=Columns()):
    return [(m["role"], m["content"]) for m in to_example(Record("f", 1, row), fmt, columns).messages]


def test_each_format_becomes_messages():
    assert _messages({"content": "c", "summary": "s"}, "adgen") == [("user", "c"), ("assistant", "s")]
    assert _messages({"prompt": "p", "completion": "c"}, "prompt-completion") == [("user", "p"), ("assistant", "c")]
    assert _messages({"context": "x", "target": "y"}, "context-target") == [("user", "x"), ("assistant", "y")]
    assert _messages({"instruction": "i", "input": "in", "output": "o"}, "alpaca") == [("user", "i\nin"), ("assistant", "o")]
    assert _messages({"instruction": "i", "input": "", "output": "o"}, "alpaca") == [("user", "i"), ("assistant", "o")]
    conv = {"conversations": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                              {"role": "assistant", "content": "a"}, {"role": "user", "content": "dangling"}]}
    assert _messages(conv, "conversations") == [("system", "s"), ("user", "u"), ("assistant", "a")]


def test_history_column_and_custom_columns():
    row = {"q": "now", "a": "ans", "h": [["q1", "a1"]]}
    assert _messages(row, "adgen", Columns("q", "a", "h")) == [("user", "q1"), ("assistant", "a1"), ("user", "now"), ("assistant", "ans")]
    with pytest.raises(BadRow, match="item 0 must be a \\[query, response\\] pair"):
        to_example(Record("f", 3, {"q": "x", "a": "y", "h": [["only one"]]}), "adgen", Columns("q", "a", "h"))


def test_empty_prompt_or_answer_is_skipped_not_an_error():
    assert to_example(Record("f", 1, {"content": "", "summary": "s"}), "adgen", Columns()) is None
    assert to_example(Record("f", 1, {"conversations": [{"role": "user", "content": "u"}]}), "conversations", Columns()) is None


def test_bad_rows_name_file_line_field_and_expectation():
    with pytest.raises(BadRow, match=r"^data.json:7: field 'summary' must be a string, got int"):
        to_example(Record("data.json", 7, {"content": "c", "summary": 3}), "adgen", Columns())
    with pytest.raises(BadRow, match=r"missing field 'summary' \(fields found: content, other\)"):
        to_example(Record("data.json", 2, {"content": "c", "other": 1}), "adgen", Columns())
    with pytest.raises(BadRow, match="expected a JSON object, got list"):
        to_example(Record("data.json", 2, [1, 2]), "adgen", Columns())
    with pytest.raises(BadRow, match="role must be one of"):
        to_example(Record("d", 1, {"conversations": [{"role": "bot", "content": "x"}]}), "conversations", Columns())


def test_detection_and_its_failure_lists_columns():
    assert detect_format([{"instruction": "i", "output": "o"}], Columns(), "f")[0] == "alpaca"
    assert detect_format([{"conversations": []}], Columns(), "f")[0] == "conversations"
    assert detect_format([{"q": 1, "a": 2}], Columns("q", "a"), "f")[0] == "adgen"
    assert detect_format([{"context": "", "target": ""}], Columns(), "f")[0] == "context-target"
    with pytest.raises(UserError, match=r"columns found \(foo, text\)"):
        detect_format([{"text": "x", "foo": 1}], Columns(), "f")


def test_json_array_records_keep_line_numbers(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n  {"content": "a", "summary": "b"},\n\n  {"content": "c",\n   "summary": "d"}\n]\n')
    records = list(read_records(path))
    assert [r.line for r in records] == [2, 4]
    assert records[1].value == {"content": "c", "summary": "d"}


def test_jsonl_malformed_line_is_a_bad_row_with_its_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"content": "a", "summary": "b"}) + "\n{not json\n")
    records = list(read_records(path))
    assert isinstance(records[1], BadRow) and records[1].where == f"{path}:2"


def test_empty_and_broken_files(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n \n")
    with pytest.raises(UserError, match="the file is empty"):
        list(read_records(tmp_path / "e.jsonl"))
    (tmp_path / "b.json").write_text('[{"content": "a"},\n {"content": }]')
    with pytest.raises(UserError, match=r"b.json:2: invalid JSON"):
        list(read_records(tmp_path / "b.json"))
