import json
import os
import sys
import tracemalloc
from pathlib import Path

import pytest

from medtune.data.check import check_file, format_report
from medtune.data.sources import (
    PARSERS,
    SCHEMAS,
    Conversation,
    Rejection,
    detect_schema,
    read_records,
)
from medtune.errors import MedtuneError
from medtune.formats.files import _iter_json_array

SHARED_DATA = Path(os.environ.get("MEDTUNE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

GOOD = {"instruction": "Please answer the following multiple-choice question:\nQ?\nA. x\nB. y", "input": "",
        "output": "Reasoning.\nThe answer is A."}
Q, A = "Which vitamin prevents scurvy?", "Vitamin C.\nThe answer is C."
EXPECTED = ({"role": "user", "content": Q}, {"role": "assistant", "content": A})
# One record per schema, all meaning the same conversation (so they are duplicates of one another).
BY_SCHEMA = {
    "reasonmed": {"instruction": Q, "input": "", "output": A},
    "messages": {"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": A}]},
    "conversations": {"conversations": [{"role": "user", "content": Q}, {"role": "assistant", "content": A}]},
    "sharegpt": {"conversations": [{"from": "human", "value": Q}, {"from": "gpt", "value": A}]},
}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def outcomes(path: Path, schema: str = "auto", **kwargs) -> dict[str, Conversation | Rejection]:
    return {item.location: item for item in read_records(path, schema, **kwargs)}


def test_every_record_is_used_or_rejected_with_its_reason(tmp_path):
    lines = [
        "\ufeff" + json.dumps(GOOD),                                     # 1: BOM accepted
        "",                                                              # 2: blank line, not a record
        '{"instruction": "x", "input": "", "output": ',                  # 3: malformed JSON
        json.dumps({**GOOD, "output": None}),                            # 4: null
        json.dumps({**GOOD, "output": "   "}),                           # 5: empty
        json.dumps({**GOOD, "instruction": 3}),                          # 6: wrong type
        json.dumps({"instruction": "q", "input": ""}),                   # 7: missing
        json.dumps(GOOD),                                                # 8: duplicate of 1
        json.dumps([1, 2]),                                              # 9: not an object
        json.dumps({**GOOD, "input": "Context passage.", "output": "B then.\nThe answer is B."}),  # 10
    ]
    path = tmp_path / "d.jsonl"
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode("utf-8") + b'{"instruction": "\xff"}\n')  # 11: bad UTF-8
    items = list(read_records(path))
    used = [i for i in items if isinstance(i, Conversation)]
    rejected = {i.location: i.reason for i in items if isinstance(i, Rejection)}
    assert len(items) == 10  # 11 lines, one blank
    assert [u.location for u in used] == ["d.jsonl:1", "d.jsonl:10"]
    assert rejected == {
        "d.jsonl:3": "malformed JSON",
        "d.jsonl:4": "field 'output' is null",
        "d.jsonl:5": "field 'output' is empty",
        "d.jsonl:6": "field 'instruction' must be a string, got int",
        "d.jsonl:7": "field 'output' is missing",
        "d.jsonl:8": "exact duplicate of an earlier record",
        "d.jsonl:9": "record is not a JSON object",
        "d.jsonl:11": "not UTF-8",
    }
    assert used[1].messages[0]["content"].endswith("\n\nContext passage.")
    assert used[0].messages[1] == {"role": "assistant", "content": "Reasoning.\nThe answer is A."}
    details = {i.location: i.detail for i in items if isinstance(i, Rejection)}
    assert details["d.jsonl:3"] == "Expecting value at column 44"
    assert details["d.jsonl:11"] == "invalid start byte at byte 17"
    assert details["d.jsonl:9"] == "list"


def test_json_array_and_unreadable_files(tmp_path):
    array = tmp_path / "a.json"
    array.write_text(json.dumps([GOOD, {"output": "x"}]), encoding="utf-8")
    items = list(read_records(array))
    assert isinstance(items[0], Conversation) and items[1].location == "a.json[1]"
    assert items[1].reason == "field 'instruction' is missing"
    truncated = tmp_path / "t.json"
    truncated.write_text(json.dumps([GOOD, GOOD])[:-5], encoding="utf-8")
    with pytest.raises(MedtuneError, match="not valid JSON"):
        list(read_records(truncated))
    empty = tmp_path / "e.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(MedtuneError, match="empty"):
        list(read_records(empty))
    with pytest.raises(MedtuneError, match="not a file"):
        list(read_records(tmp_path))


# ---- schemas ----

@pytest.mark.parametrize("schema", sorted(BY_SCHEMA))
def test_each_schema_gives_the_exact_messages(tmp_path, schema):
    path = write_jsonl(tmp_path / "d.jsonl", [BY_SCHEMA[schema]])
    for named in ("auto", schema):
        [item] = read_records(path, named)
        assert item == Conversation("d.jsonl:1", EXPECTED, schema)


def test_medical_o1_joins_thinking_and_final_response():
    record = {"Question": " Q? ", "Complex_CoT": "Okay, think.\n\nMore.\n", "Response": "It is C.", "answer": "C"}
    assert detect_schema(record) == "medical_o1"
    reply = "## Thinking\n\nOkay, think.\n\nMore.\n\n## Final Response\n\nIt is C."
    messages = ({"role": "user", "content": "Q?"}, {"role": "assistant", "content": reply})
    assert PARSERS["medical_o1"](record) == messages


def test_reasonmed_input_and_roles_and_system_turns(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "Q1", "input": "  ctx  ", "output": "A1"},
        {"instruction": "Q2", "input": None, "output": "A2"},
        {"instruction": "Q3", "output": "A3"},
        {"messages": [{"role": "System", "content": "Be brief."}, {"role": "USER", "content": "Q4"},
                      {"role": "assistant", "content": "A4"}, {"role": "user", "content": "And?"},
                      {"role": "assistant", "content": " A5 ", "weight": 1}]},
        {"conversations": [{"from": "system", "value": "S"}, {"from": "user", "value": "Q6"},
                           {"from": "assistant", "value": "A6"}]},
    ])
    got = {loc: item.messages for loc, item in outcomes(path).items()}
    assert got["d.jsonl:1"][0]["content"] == "Q1\n\nctx"
    assert got["d.jsonl:2"][0]["content"] == "Q2"
    assert got["d.jsonl:3"][0]["content"] == "Q3"
    assert got["d.jsonl:4"] == (
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q4"},
        {"role": "assistant", "content": "A4"}, {"role": "user", "content": "And?"},
        {"role": "assistant", "content": "A5"},
    )
    assert [m["role"] for m in got["d.jsonl:5"]] == ["system", "user", "assistant"]


def test_mixed_schemas_in_one_file_are_detected_per_record(tmp_path):
    records = [
        {"instruction": "R?", "output": "r"},
        {"messages": [{"role": "user", "content": "M?"}, {"role": "assistant", "content": "m"}]},
        {"conversations": [{"role": "user", "content": "C?"}, {"role": "assistant", "content": "c"}]},
        {"conversations": [{"from": "human", "value": "S?"}, {"from": "gpt", "value": "s"}], "id": "x"},
        {"Question": "O?", "Complex_CoT": "think", "Response": "o"},
        {"prompt": "P?", "completion": "p"},
        {"messages": None, "instruction": "N?", "output": "n"},  # a null column of another schema is ignored
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    items = list(read_records(path))
    assert [i.schema for i in items] == ["reasonmed", "messages", "conversations", "sharegpt", "medical_o1", "",
                                         "reasonmed"]
    assert [i.messages[0]["content"] for i in items if isinstance(i, Conversation)] == [
        "R?", "M?", "C?", "S?", "O?", "N?"]
    assert items[5] == Rejection("mixed.jsonl:6", "unknown schema", "keys: prompt, completion")
    # An explicit schema parses every record as that schema.
    named = list(read_records(path, "messages"))
    assert [i.location for i in named if isinstance(i, Conversation)] == ["mixed.jsonl:2"]
    assert named[0].reason == "field 'messages' is missing"
    assert named[6].reason == "field 'messages' is null"


def test_the_same_conversation_in_another_schema_is_a_duplicate(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", list(BY_SCHEMA.values()))
    items = list(read_records(path))
    assert isinstance(items[0], Conversation)
    assert [(i.reason, i.schema) for i in items[1:]] == [
        ("exact duplicate of an earlier record", schema) for schema in list(BY_SCHEMA)[1:]]


def turns(*pairs) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


@pytest.mark.parametrize(("record", "reason", "detail"), [
    ({"messages": None}, "field 'messages' is null", ""),
    ({"messages": "hi"}, "field 'messages' must be a list, got str", ""),
    ({"messages": []}, "field 'messages' is empty", ""),
    ({"messages": [{"role": "user", "content": "q"}, "a"]}, "turn is not a JSON object", "turn 2, got str"),
    (turns(("user", "q"), ("assistant", "a"), ("tool", "x")), "unknown role 'tool'", "turn 3"),
    ({"messages": [{"role": "user", "content": "q"}, {"content": "a"}]}, "field 'role' is missing", "turn 2"),
    ({"messages": [{"role": None, "content": "q"}]}, "field 'role' is null", "turn 1"),
    (turns(("user", "q"), ("assistant", None)), "field 'content' is null", "turn 2"),
    (turns(("user", "q"), ("assistant", " \n")), "field 'content' is empty", "turn 2"),
    (turns(("user", "q"), ("assistant", ["a"])), "field 'content' must be a string, got list", "turn 2"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "field 'content' is missing", "turn 1"),
    (turns(("user", "q"), ("user", "q2")), "no assistant turn", ""),
    (turns(("system", "s")), "no assistant turn", ""),
    (turns(("user", "q"), ("assistant", "a"), ("user", "more?")), "conversation does not end with an assistant turn",
     "turn 3 is 'user'"),
    (turns(("assistant", "a"), ("user", "q"), ("assistant", "b")), "conversation does not start with a user turn",
     "turn 1 is 'assistant'"),
    (turns(("system", "s"), ("assistant", "a")), "conversation does not start with a user turn",
     "turn 2 is 'assistant'"),
    (turns(("user", "q"), ("system", "s"), ("assistant", "a")), "system turn after the first turn", "turn 2"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}, "unknown role 'bot'",
     "turn 2"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": 5}]},
     "field 'value' must be a string, got int", "turn 2"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]}, "field 'value' is missing", "turn 2"),
    ({"Question": "q", "Complex_CoT": "c"}, "field 'Response' is missing", ""),
    ({"Question": "q", "Complex_CoT": "", "Response": "r"}, "field 'Complex_CoT' is empty", ""),
    ({"Question": 1, "Complex_CoT": "c", "Response": "r"}, "field 'Question' must be a string, got int", ""),
    ({"instruction": "q", "input": 7, "output": "a"}, "field 'input' must be a string, got int", ""),
    ({}, "unknown schema", "no keys"),
])
def test_bad_records_are_rejected_with_reason_and_detail(tmp_path, record, reason, detail):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, record])
    items = list(read_records(path))
    assert isinstance(items[0], Conversation)
    assert (items[1].location, items[1].reason, items[1].detail) == ("d.jsonl:2", reason, detail)


def test_records_over_the_character_cap_are_rejected(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "q" * 100, "output": "a" * 100},
        {"instruction": "q" * 100, "output": "a" * 101},
        {"instruction": "q", "output": "a" * 200_000},
    ])
    got = outcomes(path, max_chars=200)
    assert isinstance(got["d.jsonl:1"], Conversation)
    assert got["d.jsonl:2"] == Rejection("d.jsonl:2", "record too long", "201 characters, the cap is 200", "reasonmed")
    default = outcomes(path)
    assert isinstance(default["d.jsonl:2"], Conversation)
    assert default["d.jsonl:3"].reason == "record too long"
    assert default["d.jsonl:3"].detail == "200,001 characters, the cap is 200,000"


def test_unknown_schema_names_and_bad_cap_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    with pytest.raises(MedtuneError, match="supported schemas are 'auto', 'reasonmed'"):
        list(read_records(path, "alpaca"))
    with pytest.raises(MedtuneError, match="max_chars"):
        list(read_records(path, max_chars=0))
    assert set(SCHEMAS) == {"reasonmed", "conversations", "messages", "sharegpt", "medical_o1", "pairs",
                            "multiple_choice", "medmcqa", "pubmedqa"}


# ---- JSON arrays ----

def test_json_array_with_bom_crlf_and_indentation(tmp_path):
    text = json.dumps([GOOD, BY_SCHEMA["sharegpt"], 3, GOOD], indent=2).replace("\n", "\r\n")
    path = tmp_path / "a.json"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    items = list(read_records(path))
    assert [i.location for i in items] == ["a.json[0]", "a.json[1]", "a.json[2]", "a.json[3]"]
    assert [type(i).__name__ for i in items] == ["Conversation", "Conversation", "Rejection", "Rejection"]
    assert items[1].messages == EXPECTED
    assert (items[2].reason, items[3].reason) == ("record is not a JSON object", "exact duplicate of an earlier record")
    empty = tmp_path / "empty.json"
    empty.write_text(" [ ] \n", encoding="utf-8")
    assert list(read_records(empty)) == []


@pytest.mark.parametrize(("data", "message"), [
    (b'[{"instruction": "\xff"}]', r"not UTF-8 \(invalid start byte at byte 18\)"),
    (b'\xef\xbb\xbf[{"instruction": "\xff"}]', r"not UTF-8 \(invalid start byte at byte 21\)"),
    (b'[{"a": 1},\n {"a": 2}', r"ends without '\]' after 2 elements; is it truncated\?"),
    (b'[{"a": 1},\n {"a": ', r"a.json:2: not valid JSON in element 1 \(Expecting value\); is the array truncated\?"),
    (b'[{"a": 1},\n', r"a value must follow ',' after element 0\); is the array truncated\?"),
    (b'[{"a": 1},]', r"a value must follow ','"),
    (b'[{"a": 1}\n {"a": 2}]', r"a.json:2: not valid JSON \(expected ',' or '\]' after element 0, got '\{'\)"),
    (b'[{"a": 1}] x', r"extra data after the array"),
    (b'[', r"ends without '\]' after 0 elements"),
])
def test_broken_json_arrays_are_unreadable(tmp_path, data, message):
    path = tmp_path / "a.json"
    path.write_bytes(data)
    with pytest.raises(MedtuneError, match=message) as info:
        list(read_records(path))
    assert info.value.exit_code == 2


@pytest.mark.parametrize("chunk_bytes", [4, 5, 7, 64])
def test_array_elements_split_across_chunks(tmp_path, chunk_bytes):
    values = [12345, -0.5e-3, True, None, "é€𝄞 and \"quotes\" \\u", {"k": [1, 2.5, "ü"]}, [], {}, 987654321]
    path = tmp_path / "a.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(values, ensure_ascii=False, indent=1).encode("utf-8"))
    assert [record.value for record in _iter_json_array(path, chunk_bytes)] == values


def summary(item: Conversation | Rejection) -> tuple | str:
    return item.messages if isinstance(item, Conversation) else item.reason


def test_large_json_array_streams_and_matches_jsonl(tmp_path):
    records = [{"instruction": f"Question {i}: which option?\nA. a\nB. b", "input": "",
                "output": f"Reasoning about item {i}. " * 20 + "The answer is A."} for i in range(20_000)]
    records[7] = {"instruction": "", "output": "x"}
    records[9] = records[8]
    array = tmp_path / "big.json"
    array.write_text(json.dumps(records, indent=1), encoding="utf-8")
    jsonl = write_jsonl(tmp_path / "big.jsonl", records)
    assert array.stat().st_size > 12_000_000

    tracemalloc.start()
    try:
        usable = sum(isinstance(item, Conversation) for item in read_records(array))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert usable == 20_000 - 2
    # About 5.5 MB: a 1 MiB chunk as bytes and as text, the window while it is compacted, and 20k duplicate digests;
    # reading the whole 12 MB file at once would take more than twice that.
    assert peak < 8_000_000
    from_array = [(i.location, summary(i)) for i in read_records(array)]
    from_jsonl = [(i.location, summary(i)) for i in read_records(jsonl)]
    assert len(from_array) == len(from_jsonl) == 20_000
    assert [x for _, x in from_array] == [x for _, x in from_jsonl]
    assert from_array[7] == ("big.json[7]", "field 'instruction' is empty")
    assert from_jsonl[9] == ("big.jsonl:10", "exact duplicate of an earlier record")


# ---- Parquet ----

def test_parquet_is_read_in_batches(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [{"instruction": f"Q{i}", "input": "", "output": f"A{i}", "messages": None} for i in range(2500)]
    rows[5] = {"instruction": None, "input": None, "output": None,
               "messages": [{"role": "user", "content": "M?"}, {"role": "assistant", "content": "m"}]}
    rows[2000]["output"] = None
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=700)
    items = list(read_records(path))
    assert len(items) == 2500 and items[-1].location == "d.parquet[2499]"
    assert items[5] == Conversation("d.parquet[5]", ({"role": "user", "content": "M?"},
                                                     {"role": "assistant", "content": "m"}), "messages")
    assert items[1500].messages == ({"role": "user", "content": "Q1500"}, {"role": "assistant", "content": "A1500"})
    assert items[2000] == Rejection("d.parquet[2000]", "field 'output' is null", "", "reasonmed")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(MedtuneError, match="not a readable Parquet file"):
        list(read_records(broken))


def test_parquet_without_pyarrow_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1....PAR1")
    with pytest.raises(MedtuneError, match="pip install pyarrow"):
        list(read_records(path))


# ---- data check ----

def test_check_file_counts_add_up_and_show_examples(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        GOOD, BY_SCHEMA["sharegpt"], GOOD, {"instruction": "q"}, {"instruction": "q2", "output": ""},
        {"x": 1}, turns(("user", "a"), ("bot", "b")), {"instruction": "q3"}, {"instruction": "q4"},
        {"instruction": "q5"},
    ])
    report = check_file(path)
    assert report == {
        "path": str(path),
        "record_kind": "conversations",
        "records": 10,
        "usable": 2,
        "rejected": 8,
        "rejected_by_reason": {"field 'output' is missing": 4, "exact duplicate of an earlier record": 1,
                               "field 'output' is empty": 1, "unknown schema": 1, "unknown role 'bot'": 1},
        "schemas": {"reasonmed": 7, "sharegpt": 1, "messages": 1},
        "examples": {"field 'output' is missing": ["d.jsonl:4", "d.jsonl:8", "d.jsonl:9"],
                     "exact duplicate of an earlier record": ["d.jsonl:3"],
                     "field 'output' is empty": ["d.jsonl:5"],
                     "unknown schema": ["d.jsonl:6 (keys: x)"],
                     "unknown role 'bot'": ["d.jsonl:7 (turn 2)"]},
    }
    assert report["records"] == report["usable"] + report["rejected"] == sum(report["rejected_by_reason"].values()) + 2
    text = format_report(report)
    assert text.splitlines()[0] == f"{path}: 10 records, 2 usable, 8 rejected"
    assert "schemas: reasonmed 7, sharegpt 1, messages 1" in text
    assert "  4  field 'output' is missing\n     e.g. d.jsonl:4; d.jsonl:8; d.jsonl:9" in text


def test_check_file_raises_for_unreadable_files(tmp_path):
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n", encoding="utf-8")
    truncated = tmp_path / "t.json"
    truncated.write_text(json.dumps([GOOD, GOOD])[:-5], encoding="utf-8")
    for path, message in [(blank, "no records"), (truncated, "truncated"), (tmp_path / "none.json", "file not found")]:
        with pytest.raises(MedtuneError, match=message) as info:
            check_file(path)
        assert info.value.exit_code == 2


# ---- the real shared data ----

@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not here")
@pytest.mark.parametrize(("name", "schema", "count"), [
    ("huatuogpt_o1/demo_data.json", "medical_o1", 198),
    ("ultramedical/examples.json", "sharegpt", 50),
])
def test_shared_data_files_parse(name, schema, count):
    path = SHARED_DATA / name
    report = check_file(path)
    assert (report["records"], report["usable"], report["schemas"]) == (count, count, {schema: count})
    items = list(read_records(path, schema))
    record = json.loads(path.read_text(encoding="utf-8"))[0]
    if schema == "medical_o1":
        assert items[0].messages == (
            {"role": "user", "content": record["Question"].strip()},
            {"role": "assistant", "content": f"## Thinking\n\n{record['Complex_CoT'].strip()}\n\n## Final Response"
                                             f"\n\n{record['Response'].strip()}"})
    else:
        assert items[0].messages == (
            {"role": "user", "content": record["conversations"][0]["value"].strip()},
            {"role": "assistant", "content": record["conversations"][1]["value"].strip()})
