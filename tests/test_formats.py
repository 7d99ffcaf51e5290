"""Data files as people keep them: compressed, JSON documents keyed by id, and multiple-choice records as training
data, read by one reader per format for both the data stage and evaluation."""

import bz2
import gzip
import json
import lzma
import os
import random
from pathlib import Path

import pytest
import zstandard
from typer.testing import CliRunner

from medtune.answers import extract_letter
from medtune.cli import app
from medtune.contamination import ContaminationGuard, question_stem
from medtune.data.sources import Conversation, Rejection, read_records
from medtune.errors import MedtuneError
from medtune.formats.benchmarks import load_benchmark
from medtune.formats.files import iter_raw_records

SHARED_DATA = Path(os.environ.get("MEDTUNE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

COMPRESS = {
    ".gz": gzip.compress,
    ".bz2": bz2.compress,
    ".xz": lzma.compress,
    ".zst": lambda data: zstandard.ZstdCompressor().compress(data),
}
GOOD = {"instruction": "Please answer the following multiple-choice question:\nQ?\nA. x\nB. y", "input": "",
        "output": "Reasoning.\nThe answer is A."}


def outcomes(path: Path) -> list[tuple[str, str]]:
    return [(item.location, item.reason if isinstance(item, Rejection) else "used") for item in read_records(path)]


def shared(rel: str) -> Path:
    path = SHARED_DATA / rel
    if not path.is_file():
        pytest.skip(f"shared data file {rel} is not here")
    return path


# ---- compressed files ----

@pytest.mark.parametrize("suffix", sorted(COMPRESS))
def test_compressed_jsonl_reads_like_the_plain_file_with_the_same_locations(tmp_path, suffix):
    lines = [json.dumps(GOOD), "", '{"instruction": "x", "output": ', json.dumps({**GOOD, "output": None}),
             json.dumps(GOOD)]
    data = ("\n".join(lines) + "\n").encode("utf-8")
    plain = tmp_path / "d.jsonl"
    plain.write_bytes(data)
    packed = tmp_path / f"d.jsonl{suffix}"
    packed.write_bytes(COMPRESS[suffix](data))
    expected = [("d.jsonl:1", "used"), ("d.jsonl:3", "malformed JSON"), ("d.jsonl:4", "field 'output' is null"),
                ("d.jsonl:5", "exact duplicate of an earlier record")]
    assert outcomes(plain) == expected
    assert outcomes(packed) == [(f"d.jsonl{suffix}{loc[len('d.jsonl'):]}", why) for loc, why in expected]
    # told by the first bytes, not the name
    misnamed = tmp_path / "train.jsonl"
    misnamed.write_bytes(COMPRESS[suffix](data))
    assert [why for _, why in outcomes(misnamed)] == [why for _, why in expected]


def test_compressed_json_array_streams_and_eval_reads_compressed_benchmarks(tmp_path):
    records = [{**GOOD, "output": f"Reasoning {i}.\nThe answer is A."} for i in range(3000)]
    path = tmp_path / "a.json.gz"
    path.write_bytes(gzip.compress(json.dumps(records, indent=1).encode("utf-8")))
    items = list(read_records(path))
    assert len(items) == 3000 and all(isinstance(i, Conversation) for i in items)
    assert items[2999].location == "a.json.gz[2999]"

    medqa = shared("medagents_benchmark/medqa/test.jsonl")
    packed = tmp_path / "test.jsonl.zst"
    packed.write_bytes(zstandard.ZstdCompressor().compress(medqa.read_bytes()))
    assert load_benchmark("medqa", packed) == load_benchmark("medqa", medqa)


def test_binary_and_broken_files_are_one_error(tmp_path):
    noise = tmp_path / "weights.jsonl"
    noise.write_bytes(random.Random(0).randbytes(20_000))
    with pytest.raises(MedtuneError, match=r"weights.jsonl: not a text data file \(binary content") as info:
        list(read_records(noise))
    assert info.value.exit_code == 2
    packed_noise = tmp_path / "noise.bin.gz"
    packed_noise.write_bytes(gzip.compress(noise.read_bytes()))
    with pytest.raises(MedtuneError, match=r"not a text data file after gzip decompression"):
        list(read_records(packed_noise))
    archive = tmp_path / "data.zip"
    archive.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    with pytest.raises(MedtuneError, match=r"a zip archive, not a data file: extract it"):
        list(read_records(archive))
    cut = tmp_path / "cut.jsonl.gz"
    whole = gzip.compress("".join(json.dumps({**GOOD, "input": str(random.Random(i).random())}) + "\n"
                                  for i in range(2000)).encode())
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(MedtuneError, match=r"cut.jsonl.gz: the gzip data is corrupt or cut off"):
        list(read_records(cut))
    frames = zstandard.ZstdCompressor().compress(whole)  # any compressed content will do: gzip bytes as data
    cut_zstd = tmp_path / "cut.zst"
    cut_zstd.write_bytes(frames[: len(frames) // 2])
    with pytest.raises(MedtuneError, match=r"the zstd data is corrupt or cut off \(the last zstd frame ends early"):
        list(iter_raw_records(cut_zstd))
    two_frames = tmp_path / "two.jsonl.zst"  # as pzstd or `cat a.zst b.zst` write them
    one = zstandard.ZstdCompressor().compress((json.dumps(GOOD) + "\n").encode())
    two_frames.write_bytes(one + zstandard.ZstdCompressor().compress(json.dumps({**GOOD, "input": "2"}).encode()))
    assert outcomes(two_frames) == [("two.jsonl.zst:1", "used"), ("two.jsonl.zst:2", "used")]
    empty = tmp_path / "empty.jsonl.xz"
    empty.write_bytes(lzma.compress(b""))
    with pytest.raises(MedtuneError, match=r"the file is empty after xz decompression"):
        list(read_records(empty))

    result = CliRunner().invoke(app, ["data", "check", str(noise)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a text data file" in lines[0] and "Traceback" not in result.output


# ---- JSON documents ----

def test_keyed_document_is_read_as_records_with_their_keys(tmp_path):
    ori = shared("pubmedqa/ori_pqal.json")
    raw = list(iter_raw_records(ori))
    assert len(raw) == 1000 and raw[0].key == "21645374" and raw[0].location == "ori_pqal.json:2 (21645374)"
    items = list(read_records(ori))
    assert len(items) == 1000 and all(isinstance(i, Conversation) and i.schema == "pubmedqa" for i in items)
    first = items[0].messages
    assert first[0]["content"].startswith("Please answer the following multiple-choice question:\nDo mitochondria")
    assert "\nA. yes\nB. no\nC. maybe\n\nProgrammed cell death" in first[0]["content"]
    assert first[1]["content"].startswith("Results depicted mitochondrial dynamics")
    assert first[1]["content"].endswith("\n\nThe answer is A.")
    # compressed and minified on one line: the same records
    packed = tmp_path / "ori_pqal.json.bz2"
    packed.write_bytes(bz2.compress(json.dumps(json.loads(ori.read_bytes())).encode()))
    assert [i.messages for i in read_records(packed)] == [i.messages for i in items]

    # the guard sees exactly the 500 official test questions among the 1000
    guard = ContaminationGuard({"pubmedqa": [(i.id, i.question) for i in load_benchmark("pubmedqa", ori)]})
    flagged = [i for i in items if guard.check(question_stem(i.messages[0]["content"]))]
    assert len(flagged) == 500


@pytest.mark.parametrize(("text", "message"), [
    ('{\n  "instruction": "Q?",\n  "output": "A."\n}\n', r"one.json:2: key 'instruction' holds a string, not a record"),
    ('{\n "MedMCQA_validation": [{"question": "Q?"}]\n}', r"key 'MedMCQA_validation' holds a list, not a record"),
    ('{\n "1": {"instruction": "Q?", "output": "A."},\n "2": {"x": 1}', r"ends without '}' after 2 records"),
])
def test_other_json_documents_are_one_clear_error(tmp_path, text, message):
    path = tmp_path / "one.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(MedtuneError, match=message) as info:
        list(read_records(path))
    assert info.value.exit_code == 2


def test_jsonl_with_a_broken_first_line_is_still_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "Q?", "output": \n' + json.dumps(GOOD) + "\n", encoding="utf-8")
    assert outcomes(path) == [("d.jsonl:1", "malformed JSON"), ("d.jsonl:2", "used")]


# ---- multiple-choice records as training data ----

def test_medmcqa_dev_is_training_data_with_explanations_and_a_final_answer():
    dev = shared("medmcqa_dev/dev.json")
    items = list(read_records(dev))
    assert len(items) == 4183
    used = [i for i in items if isinstance(i, Conversation)]
    assert all(i.schema == "medmcqa" for i in items if i.schema)
    rows = [json.loads(line) for line in dev.read_text(encoding="utf-8").splitlines() if line.strip()]
    by_location = {f"dev.json:{n}": row for n, row in enumerate(rows, start=1)}
    with_exp = 0
    for conv in used:
        row = by_location[conv.location]
        user, reply = conv.messages[0]["content"], conv.messages[1]["content"]
        options = dict(zip("ABCD", (row["opa"], row["opb"], row["opc"], row["opd"])))
        assert user.endswith("\n" + "\n".join(f"{k}. {v}" for k, v in options.items()))
        assert reply.endswith(f"The answer is {'ABCD'[row['cop'] - 1]}.")  # the original release is 1-based
        assert extract_letter(reply, options) == "ABCD"[row["cop"] - 1]
        with_exp += bool(row["exp"] and row["exp"].strip())
        if row["exp"] and row["exp"].strip():
            assert reply.startswith(row["exp"].strip()[:50])
    assert with_exp > 2000
    rejected = [i for i in items if isinstance(i, Rejection)]
    assert len(used) + len(rejected) == 4183
    assert {r.reason for r in rejected} <= {"exact duplicate of an earlier record", "field 'opa' must be the option "
                                            "text (a string)", "field 'opb' must be the option text (a string)",
                                            "field 'opc' must be the option text (a string)",
                                            "field 'opd' must be the option text (a string)"}


def test_medqa_afrimed_and_cot_records_render_as_reasonmed():
    afrimed = list(read_records(shared("medagents_benchmark/afrimedqa/train.jsonl")))
    assert afrimed and all(isinstance(i, Conversation) and i.schema == "multiple_choice" for i in afrimed)
    row = json.loads(shared("medagents_benchmark/afrimedqa/train.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert afrimed[0].messages[1]["content"] == f"{row['reason'].strip()}\n\nThe answer is {row['answer_idx']}."
    medqa = list(read_records(shared("medagents_benchmark/medqa/test.jsonl")))
    assert len(medqa) == 1273 and all(isinstance(i, Conversation) for i in medqa)
    assert medqa[0].messages[1]["content"] == "The answer is B."  # no explanation: the final line alone
    cot = list(read_records(shared("cot/medical_cot_train.jsonl")))
    assert len(cot) == 221 and {i.schema for i in cot} == {"multiple_choice"}
    huatuo = list(read_records(shared("huatuogpt_o1/demo_data.json")))
    assert {i.schema for i in huatuo} == {"medical_o1"}  # its chat fields win over its multiple-choice fields


def test_medmcqa_rows_wait_for_the_cop_base_and_keep_their_order(tmp_path):
    def row(n, cop):
        return {"id": f"q{n}", "question": f"Question {n}?", "opa": "one", "opb": "two", "opc": "three",
                "opd": "four", "cop": cop, "exp": None}

    path = tmp_path / "hub.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [row(1, 2), GOOD, row(2, 1), row(3, 0), row(4, 4)]) + "\n",
                    encoding="utf-8")
    items = list(read_records(path))
    assert [i.location for i in items] == [f"hub.jsonl:{n}" for n in range(1, 6)]
    assert [i.messages[1]["content"] for i in items[:4]] == ["The answer is C.", GOOD["output"], "The answer is B.",
                                                             "The answer is A."]
    assert items[4] == Rejection("hub.jsonl:5", "field 'cop' is out of range",
                                 "field 'cop' 4 is out of range for 0-based indices", "medmcqa")
    path.write_text("\n".join(json.dumps(r) for r in [row(1, 2), row(2, 3)]) + "\n", encoding="utf-8")
    assert [(i.location, i.reason) for i in read_records(path)] == [
        ("hub.jsonl:1", "MedMCQA 'cop' base unknown"), ("hub.jsonl:2", "MedMCQA 'cop' base unknown")]
