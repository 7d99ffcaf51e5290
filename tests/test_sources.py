import json

import pytest

from medtune.data.sources import Conversation, Rejection, read_records
from medtune.errors import MedtuneError

GOOD = {"instruction": "Please answer the following multiple-choice question:\nQ?\nA. x\nB. y", "input": "",
        "output": "Reasoning.\nThe answer is A."}


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


def test_json_array_and_unreadable_files(tmp_path):
    array = tmp_path / "a.json"
    array.write_text(json.dumps([GOOD, {"output": "x"}]), encoding="utf-8")
    items = list(read_records(array))
    assert isinstance(items[0], Conversation) and items[1].location == "a.json[1]"
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
