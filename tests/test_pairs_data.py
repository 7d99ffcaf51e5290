"""Preference pairs through the data stage: reading the TRL shapes, rejections, the 2k/2k+1 layout and masks,
length policies on both replies, the chat-template check and `medtune data check` on a pair file."""

from __future__ import annotations

import gzip
import json

import pytest
import yaml
from conftest import reasonmed_record, write_jsonl
from typer.testing import CliRunner

from medtune.artifacts import RunDir
from medtune.config import load_config
from medtune.data import stage as prepare
from medtune.data.formatting import ChatFormatter
from medtune.data.pair_records import Pair, encode_pairs, read_pairs
from medtune.errors import MedtuneError
from medtune.prepared import load_split
from medtune.ui import UI

EOT = "<|im_end|>"
QUESTION = "Which vitamin deficiency causes scurvy?\nA. Vitamin A\nB. Vitamin B12\nC. Vitamin C\nD. Vitamin D"
GOOD = "Scurvy comes from a lack of vitamin C, needed for collagen.\nThe answer is C."
BAD = "Scurvy comes from a lack of vitamin D.\nThe answer is D."


def pair(i: int, **extra) -> dict:
    return {"prompt": f"Question {i}: {QUESTION}", "chosen": f"{GOOD} ({i})", "rejected": f"{BAD} ({i})", **extra}


@pytest.fixture
def make_run(tmp_path, tiny_base):
    """Write `records` and a config over them; run the data stage; return (prepared folder, report)."""
    def run(records: list, objective: str = "dpo", benchmark: list | None = None, **data) -> tuple:
        write_jsonl(tmp_path / "pairs.jsonl", records)
        cfg = {"name": "p", "run_dir": str(tmp_path / "run"), "seed": 1, "base": {"model": str(tiny_base)},
               "data": {"path": str(tmp_path / "pairs.jsonl"), "max_len": 256, "val_fraction": 0.0, **data},
               "train": {"objective": objective}, "export": {"name": "p", "types": ["F16"]}}
        if benchmark is not None:
            bench = write_jsonl(tmp_path / "bench.jsonl", benchmark)
            cfg["eval"] = {"benchmarks": [{"name": "bench", "path": str(bench)}]}
        (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
        config = load_config(tmp_path / "p.yaml")
        out = tmp_path / "prepared"
        out.mkdir(exist_ok=True)
        report = prepare.run(config, RunDir(config.run_dir), out, UI())
        assert json.loads((out / "report.json").read_text()) == report
        assert report["records_read"] == report["used"] + report["rejected"]
        return out, report
    return run


def rejections(out) -> dict[str, tuple[str, str]]:
    rows = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    return {r["location"]: (r["reason"], r["detail"]) for r in rows}


def labelled(tok, ids, mask) -> str:
    return tok.decode([int(t) for t, m in zip(ids, mask) if m])


def test_pairs_are_written_chosen_then_rejected_with_the_sft_encoding(make_run, smollm2_tokenizer):
    tok = smollm2_tokenizer
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"},
               {"role": "assistant", "content": "Hello. Ask your question."}, {"role": "user", "content": QUESTION}]
    records = [
        pair(0, id="p-0"),
        {"prompt": history, "chosen": [{"role": "assistant", "content": GOOD}],
         "rejected": [{"role": "assistant", "content": BAD}], "id": 7},
        {"chosen": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": f"{GOOD} (implicit)"}],
         "rejected": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": f"{BAD} (implicit)"}]},
    ]
    out, report = make_run(records, system_prompt="You are a careful clinician.")
    assert report["record_kind"] == "pairs" and report["pairs"] == {"train": 3, "val": 0}
    assert report["used"] == 3 and report["rejected"] == 0 and report["train_rows"] == 6
    assert not (out / "train.packs.npy").exists()
    examples = load_split(out, "train")
    assert len(examples) == 6
    fmt = ChatFormatter(tok, "You are a careful clinician.")
    prompts = [[{"role": "user", "content": records[0]["prompt"]}], history, records[2]["chosen"][:1]]
    replies = [(records[0]["chosen"], records[0]["rejected"]), (GOOD, BAD),
               (f"{GOOD} (implicit)", f"{BAD} (implicit)")]
    for k, (prompt, pair_replies) in enumerate(zip(prompts, replies)):
        for side, reply in enumerate(pair_replies):
            ids, mask = examples[2 * k + side]
            assert labelled(tok, ids, mask) == reply + EOT  # only the final reply and its end-of-turn token
            start = int(mask.argmax())
            assert not mask[:start].any() and mask[start:].all()
            expected = fmt.encode([*prompt, {"role": "assistant", "content": reply}])
            assert ids.tolist() == expected.input_ids  # exactly the SFT encoding
            assert tok.decode(ids[:start]) == fmt.prompt_text(prompt)
        assert examples[2 * k][0][:start].tolist() == examples[2 * k + 1][0][:start].tolist()  # one prompt
    # the system prompt applies as for SFT; a record's own system turn wins
    assert tok.decode(examples[0][0]).startswith("<|im_start|>system\nYou are a careful clinician.")
    assert tok.decode(examples[2][0]).startswith("<|im_start|>system\nBe brief.")
    assert "Hello. Ask your question." in tok.decode(examples[2][0])  # in the prompt, not trained
    index = [json.loads(line) for line in (out / "train.pairs.jsonl").read_text().splitlines()]
    assert index == [{"location": "pairs.jsonl:1", "id": "p-0"}, {"location": "pairs.jsonl:2", "id": "7"},
                     {"location": "pairs.jsonl:3", "id": None}]


def test_every_bad_record_is_rejected_with_its_location_and_reason(make_run):
    q = {"role": "user", "content": QUESTION}
    records = [
        pair(0),
        pair(1, rejected=f"{GOOD} (1)"),  # 2: identical replies
        pair(2, chosen="   "),  # 3: empty reply
        pair(0),  # 4: duplicate of line 1
        reasonmed_record(0),  # 5: a conversation
        {"chosen": [q, {"role": "assistant", "content": GOOD}],  # 6: implicit prompts that differ
         "rejected": [{"role": "user", "content": "Another question?"}, {"role": "assistant", "content": BAD}]},
        {"prompt": "Q?", "chosen": "A."},  # 7: no rejected
        {"prompt": [q, {"role": "assistant", "content": "Hm."}], "chosen": "A.", "rejected": "B."},  # 8
        {"prompt": "Q?", "chosen": [{"role": "assistant", "content": "A."}, q], "rejected": "B."},  # 9
        {"chosen": "A.", "rejected": "B."},  # 10: plain text without a prompt
        pair(3, chosen={"text": GOOD}),  # 11
        pair(4, chosen=[{"role": "assistant", "content": ""}]),  # 12: empty reply in a message list
        "not an object",  # 13
    ]
    out, report = make_run(records)
    assert report["records_read"] == 13 and report["used"] == 1 and report["rejected"] == 12
    got = rejections(out)
    assert got["pairs.jsonl:2"][0] == "chosen and rejected are identical"
    assert got["pairs.jsonl:3"][0] == "field 'chosen' is empty"
    assert got["pairs.jsonl:4"][0] == "exact duplicate of an earlier record"
    assert got["pairs.jsonl:5"] == ("not a preference pair: it needs 'chosen' and 'rejected'", "reads as reasonmed")
    assert got["pairs.jsonl:6"] == ("chosen and rejected differ before their final turn", "turn 1")
    assert got["pairs.jsonl:7"][0] == "field 'rejected' is missing"
    assert got["pairs.jsonl:8"][0] == "prompt does not end with a user turn"
    assert got["pairs.jsonl:9"] == ("field 'chosen' must be one assistant turn", "got 2 turn(s): assistant, user")
    assert got["pairs.jsonl:10"][0] == "field 'prompt' is missing"
    assert got["pairs.jsonl:11"][0] == "field 'chosen' must be a string or a list of messages"
    assert got["pairs.jsonl:12"] == ("field 'content' is empty", "chosen turn 1")
    assert got["pairs.jsonl:13"][0] == "record is not a JSON object"
    assert sum(report["rejected_by_reason"].values()) == 12


def test_strict_limit_and_split_by_prompt(make_run):
    records = [pair(i) for i in range(40)] + [pair(0, rejected="Another wrong reply.")]  # same prompt as 0
    _, report = make_run(records, limit=10)
    assert report["records_read"] == 10 and report["used"] == 10
    out, report = make_run(records, val_fraction=0.3)
    assert report["pairs"]["train"] + report["pairs"]["val"] == 41 and report["pairs"]["val"] > 0
    assert report["val_rows"] == 2 * report["pairs"]["val"]
    locations = {split: [json.loads(line)["location"] for line in (out / f"{split}.pairs.jsonl").open()]
                 for split in ("train", "val")}
    both = [s for s, locs in locations.items() if "pairs.jsonl:1" in locs or "pairs.jsonl:41" in locs]
    assert len(both) == 1  # the two pairs of one prompt land in one split
    with pytest.raises(MedtuneError, match="1 record.s. rejected and data.strict is on: pairs.jsonl:2"):
        make_run([pair(0), pair(0)], strict=True)


def test_sft_run_rejects_pairs_and_dpo_run_rejects_conversations(make_run):
    out, report = make_run([reasonmed_record(0), pair(0)], objective="sft")
    assert report["record_kind"] == "conversations" and report["used"] == 1
    reason, _ = rejections(out)["pairs.jsonl:2"]
    assert "train.objective" in reason and "dpo or orpo" in reason
    out, report = make_run([reasonmed_record(0), pair(0)], objective="orpo")
    assert report["record_kind"] == "pairs" and report["used"] == 1
    assert rejections(out)["pairs.jsonl:1"][0].startswith("not a preference pair")
    with pytest.raises(MedtuneError, match="data.schema 'reasonmed' holds conversations.*train.objective"):
        make_run([pair(0)], schema="reasonmed")
    with pytest.raises(MedtuneError, match="data.schema is 'pairs' but train.objective is 'sft'"):
        make_run([pair(0)], objective="sft", schema="pairs")


def test_contamination_guard_reads_the_prompts_user_turn(make_run):
    stem = "A 45-year-old man has crushing chest pain radiating to the left arm for an hour; which test comes first?"
    options = {"A": "ECG", "B": "Chest X-ray", "C": "D-dimer", "D": "Echocardiogram"}
    listed = "\n".join(f"{k}. {v}" for k, v in options.items())
    records = [
        {"prompt": [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": f"Please answer the following multiple-choice question:\n{stem}\n"
                                                f"{listed}"}],
         "chosen": "The answer is A.", "rejected": "The answer is C."},
        pair(1),
    ]
    benchmark = [{"question": stem, "options": options, "answer_idx": "A"}]
    out, report = make_run(records, benchmark=benchmark, contamination="drop")
    assert report["used"] == 1 and report["contaminated"] == 1
    assert rejections(out)["pairs.jsonl:1"][0] == "overlaps an evaluation question"
    out, report = make_run(records, benchmark=benchmark)  # "report": kept, and listed
    assert report["used"] == 2 and report["contaminated"] == 1
    flagged = json.loads((out / "contamination.jsonl").read_text())
    assert flagged["location"] == "pairs.jsonl:1" and flagged["matches"][0]["kind"] == "exact"


def long_reply(letter: str, steps: int) -> str:
    body = "\n".join(f"{i}. A long step of reasoning towards {letter}, number {i}." for i in range(steps))
    return f"{body}\nSummary: it is {letter}.\nThe answer is {letter}."


def test_length_policies_apply_to_both_replies(make_run, smollm2_tokenizer):
    tok = smollm2_tokenizer
    records = [
        {"prompt": QUESTION, "chosen": long_reply("C", 40), "rejected": "Short.\nThe answer is D."},  # chosen over
        {"prompt": QUESTION + " (2)", "chosen": "Short.\nThe answer is C.", "rejected": long_reply("D", 40)},
        {"prompt": QUESTION + " (3)", "chosen": long_reply("C", 40), "rejected": long_reply("D", 45)},
        {"prompt": QUESTION + " (4)", "chosen": "Short.\nThe answer is C.", "rejected": "Short.\nThe answer is D."},
    ]
    out, report = make_run(records, max_len=128, length_policy="drop")
    assert report["used"] == 1 and report["replies"]["chosen"]["over_max_len"] == 2
    assert report["replies"]["rejected"]["over_max_len"] == 2
    got = rejections(out)
    assert got["pairs.jsonl:1"][0] == "longer than data.max_len" and got["pairs.jsonl:1"][1].startswith("chosen ")
    assert got["pairs.jsonl:2"][1].startswith("rejected ")
    assert "chosen" in got["pairs.jsonl:3"][1] and "rejected" in got["pairs.jsonl:3"][1]

    out, report = make_run(records, max_len=128, length_policy="truncate")
    assert report["used"] == 4
    for side in ("chosen", "rejected"):
        assert report["replies"][side]["truncated"] == 2 == report["replies"][side]["truncated_answer_cut"]
    examples = load_split(out, "train")
    assert [len(ids) for ids, _ in examples[4:6]] == [128, 128]  # both replies of pair 3 cut to max_len
    assert all(len(ids) <= 128 for ids, _ in examples)

    out, report = make_run(records, max_len=128, length_policy="keep_answer")
    assert report["used"] == 4
    assert report["replies"]["chosen"]["shortened_keep_answer"] == 2 == report["replies"]["rejected"][
        "shortened_keep_answer"]
    examples = load_split(out, "train")
    for (ids, mask), letter in zip(examples[4:6], "CD"):
        assert len(ids) <= 128
        text = labelled(tok, ids, mask)
        assert "[...]" in text and text.endswith(f"The answer is {letter}.{EOT}")


def test_replies_identical_inside_max_len_are_rejected(make_run):
    shared = long_reply("C", 40)  # its first 128 tokens are the same in both replies
    records = [{"prompt": QUESTION, "chosen": shared + " Yes.", "rejected": shared + " No."}, pair(1)]
    out, report = make_run(records, max_len=128, length_policy="truncate")
    assert report["used"] == 1
    assert rejections(out)["pairs.jsonl:1"] == ("chosen and rejected are identical inside data.max_len", "128 tokens")


@pytest.fixture
def glued_tokenizer(smollm2_dir):
    """SmolLM2 with a ChatML template that glues the reply to the assistant header (no newline after it)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    tok.chat_template = (
        "{%- for m in messages %}{%- if m['role'] == 'assistant' %}"
        "{{- '<|im_start|>assistant' + m['content'] + '<|im_end|>\\n' }}{%- else %}"
        "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant' }}{%- endif %}"
    )
    return tok


def test_a_template_that_merges_with_the_reply_is_an_error(glued_tokenizer, smollm2_tokenizer):
    glued = Pair("pairs.jsonl:3", ({"role": "user", "content": QUESTION},), "s are the answer: C.", "D.")
    with pytest.raises(MedtuneError, match=r"pairs.jsonl:3: field 'chosen': the reply's token ids differ from "
                                           r"the chat template's at token \d+"):
        encode_pairs(ChatFormatter(glued_tokenizer), [glued])
    # the same pair under the model's own template encodes, as apply_chat_template tokenizes it
    (chosen, rejected), = encode_pairs(ChatFormatter(smollm2_tokenizer), [glued])
    for side, enc in (("chosen", chosen), ("rejected", rejected)):
        whole = smollm2_tokenizer.apply_chat_template(glued.conversation(side), tokenize=True)["input_ids"]
        assert whole[: len(enc.input_ids)] == enc.input_ids
        assert smollm2_tokenizer.decode(whole[len(enc.input_ids):]).strip() == ""  # only the template's newline


def test_read_pairs_from_any_file_the_sft_reader_takes(tmp_path):
    array = tmp_path / "pairs.json"
    array.write_text(json.dumps([pair(0), pair(1, chosen="")]), encoding="utf-8")
    packed = tmp_path / "pairs.jsonl.gz"
    packed.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in [pair(0), pair(1, chosen="")]).encode()))
    for path, second in [(array, "pairs.json[1]"), (packed, "pairs.jsonl.gz:2")]:
        items = list(read_pairs(path))
        assert isinstance(items[0], Pair) and items[0].prompt == ({"role": "user", "content": pair(0)["prompt"]},)
        assert items[1].location == second and items[1].reason == "field 'chosen' is empty"
    with pytest.raises(MedtuneError, match="not found"):
        read_pairs(tmp_path / "absent.jsonl")  # at once, not at the first record


def test_data_check_on_a_pair_file(tmp_path):
    from medtune.cli import app

    runner = CliRunner()
    good = write_jsonl(tmp_path / "good.jsonl", [pair(0), pair(1)])
    result = runner.invoke(app, ["data", "check", str(good)])
    assert result.exit_code == 0, result.output
    assert "2 records, 2 usable preference pairs, 0 rejected" in result.output
    assert "schemas: pairs 2" in result.output
    bad = write_jsonl(tmp_path / "bad.jsonl", [pair(0), pair(1, rejected=pair(1)["chosen"]), reasonmed_record(0)])
    result = runner.invoke(app, ["data", "check", str(bad)])
    assert result.exit_code == 1
    assert "3 records, 1 usable preference pairs, 2 rejected" in result.output
    assert "bad.jsonl:2" in result.output and "chosen and rejected are identical" in result.output
    assert "bad.jsonl:3" in result.output and "not a preference pair" in result.output
    result = runner.invoke(app, ["data", "check", str(bad), "--json"])
    report = json.loads(result.output)
    assert report["record_kind"] == "pairs" and report["usable"] == 1 and report["rejected"] == 2
    # a conversation file is still checked as conversations, where a pair is rejected
    sft = write_jsonl(tmp_path / "sft.jsonl", [reasonmed_record(0), pair(0)])
    report = json.loads(runner.invoke(app, ["data", "check", str(sft), "--json"]).output)
    assert report["record_kind"] == "conversations" and report["usable"] == 1
    assert "set train.objective to dpo or orpo" in next(iter(report["rejected_by_reason"]))
