"""data.balance_letters in the data stage: balanced gold letters in prepared/, the report, and `false` giving
exactly the arrays of the records as read (the code path before balancing existed)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import yaml
from conftest import write_jsonl

from medtune.answers import final_answer
from medtune.artifacts import RunDir
from medtune.config import load_config
from medtune.data.formatting import ChatFormatter
from medtune.data.sources import Conversation, read_records
from medtune.data.stage import is_validation
from medtune.models import load_tokenizer
from medtune.pipeline import BY_NAME, run_stage
from medtune.ui import UI

FILES = ("train.ids.npy", "train.mask.npy", "train.offsets.npy", "val.ids.npy", "val.mask.npy", "val.offsets.npy")


def skewed(n: int) -> list[dict]:
    """ReasonMed records whose key is A three times in four, with references in the reasoning."""
    records = []
    for i in range(n):
        gold = "A" if i % 4 else "B"
        records.append({
            "instruction": f"Please answer the following multiple-choice question:\nCase {i}: which drug {i}?\n"
                           f"A. drug a{i}\nB. drug b{i}\nC. drug c{i}\nD. drug d{i}",
            "input": "", "output": f"Option {gold} fits case {i}; option C does not.\nThe answer is {gold}."})
    records.append({"instruction": "Please answer the following multiple-choice question:\nWhich?\nA. yes\nB. no\n"
                                   "C. maybe", "input": "", "output": "The answer is A."})
    records.append({"instruction": "Explain scurvy.", "input": "", "output": "Vitamin C deficiency."})
    return records


@pytest.fixture
def balance_config(tmp_path, tiny_base):
    data = write_jsonl(tmp_path / "train.jsonl", skewed(40))
    cfg = {"name": "balance", "run_dir": str(tmp_path / "run"), "seed": 5, "base": {"model": str(tiny_base)},
           "data": {"path": str(data), "max_len": 128, "val_fraction": 0.25, "contamination": "ignore"},
           "export": {"name": "tiny", "types": ["F16"]}}
    path = tmp_path / "balance.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def prepare(config, overrides, run_dir):
    cfg = load_config(config, [f"run_dir={run_dir}", *overrides])
    run = RunDir(cfg.run_dir)
    run_stage(BY_NAME["data"], cfg, run, UI())
    return cfg, run / "prepared"


def replies(prepared, tokenizer, split):
    ids, mask, offsets = (np.load(prepared / f"{split}.{name}.npy") for name in ("ids", "mask", "offsets"))
    return [tokenizer.decode(ids[a:b][mask[a:b] == 1]) for a, b in zip(offsets[:-1], offsets[1:])]


def test_balance_off_gives_the_arrays_of_the_records_as_read(balance_config, tmp_path):
    cfg, prepared = prepare(balance_config, ["data.balance_letters=false"], tmp_path / "off")
    # the data stage before balancing: every record as read, encoded, split by its content
    formatter = ChatFormatter(load_tokenizer(str(cfg.base.model)), None)
    expected = {"train": ([], []), "val": ([], [])}
    for conv in read_records(cfg.data.path):
        assert isinstance(conv, Conversation)
        enc = formatter.encode(list(conv.messages))
        ids, mask = expected["val" if is_validation(conv, cfg.seed, cfg.data.val_fraction) else "train"]
        ids.append(enc.input_ids)
        mask.append(enc.loss_mask)
    for split, (ids, mask) in expected.items():
        assert np.load(prepared / f"{split}.ids.npy").tolist() == [t for row in ids for t in row]
        assert np.load(prepared / f"{split}.mask.npy").tolist() == [m for row in mask for m in row]
        assert np.load(prepared / f"{split}.offsets.npy").tolist() == np.cumsum([0, *map(len, ids)]).tolist()
    letters = json.loads((prepared / "report.json").read_text())["letters"]
    assert letters["balance_letters"] is False and letters["relettered"] == 0
    assert letters["gold_counts_before"] == letters["gold_counts_after"] == {"A": 30, "B": 10}

    _, on = prepare(balance_config, [], tmp_path / "on")
    assert any((on / name).read_bytes() != (prepared / name).read_bytes() for name in FILES)
    # the split is decided on the records as read: the same number of rows in each split either way
    for split in ("train", "val"):
        assert len(np.load(on / f"{split}.offsets.npy")) == len(np.load(prepared / f"{split}.offsets.npy"))


def test_balanced_data_report_and_prepared_replies(balance_config, tmp_path):
    cfg, prepared = prepare(balance_config, [], tmp_path / "on")
    report = json.loads((prepared / "report.json").read_text())
    letters = report["letters"]
    assert letters["balance_letters"] is True and letters["multiple_choice"] == 40
    assert letters["gold_counts_before"] == {"A": 30, "B": 10}
    assert letters["gold_counts_after"] == {"A": 10, "B": 10, "C": 10, "D": 10}
    assert letters["gold_shares_before"] == {"A": 0.75, "B": 0.25}
    assert letters["gold_shares_after"] == {"A": 0.25, "B": 0.25, "C": 0.25, "D": 0.25}
    assert letters["relettered"] + letters["in_place"] == 40 and letters["kept_as_is"] == 0
    assert letters["not_multiple_choice_by_reason"] == {"yes/no/maybe labels": 1, "no lettered options": 1}
    tokenizer = load_tokenizer(str(cfg.base.model))
    texts = replies(prepared, tokenizer, "train") + replies(prepared, tokenizer, "val")
    finals = Counter(final_answer(t) for t in texts if "fits case" in t)
    assert finals == {"A": 10, "B": 10, "C": 10, "D": 10}
    for text in texts:  # the reasoning's reference names the same letter as the final line
        if "fits case" in text:
            assert text.startswith(f"Option {final_answer(text)} fits case")
    # the same seed gives the same files; another seed another assignment, as balanced
    _, again = prepare(balance_config, [], tmp_path / "again")
    assert all((again / name).read_bytes() == (prepared / name).read_bytes() for name in FILES)
    _, other = prepare(balance_config, ["seed=6"], tmp_path / "other")
    other_letters = json.loads((other / "report.json").read_text())["letters"]
    assert other_letters["gold_counts_after"] == {"A": 10, "B": 10, "C": 10, "D": 10}
