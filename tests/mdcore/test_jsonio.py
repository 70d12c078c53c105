"""Untrusted JSON is bounded in size and depth, and every failure is one line naming the file."""

import pytest

from mdcore.errors import UserInputError
from mdcore.jsonio import parse_json, read_json_file, read_jsonl_file


def test_parse_json_refuses_oversized_deep_and_malformed_input():
    assert parse_json(b'{"a": [1, 2]}') == {"a": [1, 2]}
    with pytest.raises(ValueError, match="larger than"):
        parse_json(b"[1]" * 10, max_bytes=8)
    with pytest.raises(ValueError, match="nested too deeply"):
        parse_json("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nested deeper than 3"):
        parse_json("[[[[1]]]]", max_depth=3)
    with pytest.raises(ValueError, match="not UTF-8"):
        parse_json(b'"\xff"')
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_json(b"{'a': 1}")


def test_read_json_file_names_the_file_and_checks_the_type(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("[1, 2]")
    assert read_json_file(path, expect=list) == [1, 2]
    with pytest.raises(UserInputError, match="x.json does not hold a JSON object"):
        read_json_file(path)
    with pytest.raises(UserInputError, match="not found"):
        read_json_file(tmp_path / "missing.json")
    with pytest.raises(UserInputError, match="is not a file"):
        read_json_file(tmp_path)
    path.write_bytes(b"\x80\x81")
    with pytest.raises(UserInputError, match="x.json is not UTF-8"):
        read_json_file(path)


def test_a_torn_last_line_is_dropped_and_a_bad_middle_line_is_an_error(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 0}\n{"step": 1}\n{"step": 2, "lo')
    assert [r["step"] for r in read_jsonl_file(path)] == [0, 1]
    path.write_text('{"step": 0}\n{"step": \n{"step": 2}\n')
    with pytest.raises(UserInputError, match="line 2 is not valid JSON"):
        list(read_jsonl_file(path))
    path.write_text('{"step": 0}\n[1]\n')
    with pytest.raises(UserInputError, match="line 2 is not a JSON object"):
        list(read_jsonl_file(path))
