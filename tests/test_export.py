"""GGUF conversion, quantization and every verification check: tiny random Llama, SmolLM2, and a killed export."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medtune.artifacts import RunDir, write_manifest
from medtune.export import gguf, parity, verify
from medtune.gguf_types import TYPES, file_name, ollama_choice


@pytest.fixture(scope="module")
def tiny_ggufs(tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    f16 = out / file_name("tiny", "F16")
    gguf.convert(tiny_base, f16)
    files = {"F16": f16, "BF16": out / file_name("tiny", "BF16")}
    gguf.convert(tiny_base, files["BF16"], "bf16")
    for t in ("Q8_0", "Q4_K_M"):
        files[t] = out / file_name("tiny", t)
        gguf.quantize(f16, files[t], t)
    return files


def test_names_follow_the_seed():
    assert file_name("m", "F16") == "m-fp16.gguf"
    assert file_name("m", "BF16") == "m-bf16.gguf"
    assert file_name("m", "Q4_K_M") == "m-Q4_K_M.gguf"


def test_every_type_is_a_llama_cpp_file_type_and_ollama_gets_the_smallest_close_one():
    import llama_cpp

    for t in TYPES:
        assert isinstance(getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{t.name}"), int), t.name
    assert len({t.ollama_rank for t in TYPES}) == len(TYPES)  # one choice for any set of exported types
    assert ollama_choice(["F16", "Q8_0", "Q5_K_M", "Q4_K_M"]) == "Q4_K_M"
    assert ollama_choice(["BF16", "F16", "Q8_0"]) == "Q8_0"
    assert ollama_choice(["BF16", "F16"]) == "F16"


def test_header_reader_agrees_with_gguf_py(tiny_ggufs):
    from gguf import GGUFReader

    path = tiny_ggufs["Q4_K_M"]  # GGUFReader takes seconds per file: one is enough
    header = verify.read_header(path)
    reader = GGUFReader(path)
    assert [(n, k) for n, _, k in header.tensors] == [(t.name, t.tensor_type.name) for t in reader.tensors]
    assert [s for _, s, _ in header.tensors] == [tuple(int(d) for d in t.shape) for t in reader.tensors]
    assert set(header.fields) == {k for k in reader.fields if not k.startswith("GGUF.")}
    for key in ("general.architecture", "tokenizer.chat_template", "tokenizer.ggml.eos_token_id",
                "general.file_type", "llama.block_count", "llama.rope.freq_base"):
        field = reader.fields[key]
        value = field.parts[field.data[0]]
        expected = bytes(value).decode() if field.types[0].name == "STRING" else value.tolist()[0]
        assert header.fields[key] == expected
    assert header.fields["tokenizer.ggml.tokens"] == len(reader.fields["tokenizer.ggml.tokens"].data)


def test_converted_files_pass_metadata_checks(tiny_ggufs, smollm2_tokenizer):
    for gguf_type, path in tiny_ggufs.items():
        checks = verify.check_metadata(path, gguf_type, smollm2_tokenizer.chat_template, 2)
        assert checks["problems"] == [], (gguf_type, checks)
        assert checks["architecture"] == "llama"
        assert checks["chat_template_matches"]
    q4 = verify.check_metadata(tiny_ggufs["Q4_K_M"], "Q4_K_M", smollm2_tokenizer.chat_template, 2)
    assert q4["tensor_types"].get("Q4_K", 0) > 0


def test_checks_catch_a_file_whose_name_lies(tiny_ggufs, smollm2_tokenizer):
    checks = verify.check_metadata(tiny_ggufs["Q8_0"], "Q4_K_M", smollm2_tokenizer.chat_template, 2)
    assert any("general.file_type" in p for p in checks["problems"])
    assert any("no tensor of type Q4_K" in p for p in checks["problems"])
    wrong = verify.check_metadata(tiny_ggufs["F16"], "F16", "{{ other template }}", 7)
    assert "the chat template differs from the HF model's" in wrong["problems"]
    assert any("eos token id" in p for p in wrong["problems"])


def test_parity_texts_cover_what_breaks_tokenizers(smollm2_tokenizer):
    specials = parity.specials_of(smollm2_tokenizer)
    texts = parity.parity_texts(specials, lambda m: smollm2_tokenizer.apply_chat_template(m, tokenize=False))
    assert len(texts) >= 200 and len(set(texts)) == len(texts) and all(texts)
    assert texts == parity.parity_texts(specials, lambda m: smollm2_tokenizer.apply_chat_template(m, tokenize=False))
    joined = "".join(texts)
    for needle in ("<|im_end|>", "<|im_start|>assistant\n", "<|eot_id|>", "é", "ü", "糖尿病", "🩺", "\u200b",
                   "        ", "\t\t", "\n\n\n", "\r\n", "1234567890", "def ", "SELECT", "mg/dL"):
        assert needle in joined, needle
    assert specials[0] == "<|im_end|>"
    assert len(smollm2_tokenizer(parity.HELD_OUT)["input_ids"]) >= 300


def test_parity_on_a_tiny_file_reports_every_number(tiny_ggufs, tiny_base):
    result = verify.run_parity(tiny_ggufs["Q4_K_M"], tiny_base, "Hello?", max_tokens=8, logits=False)
    tok = result["tokenizer"]
    assert tok["texts"] >= 200 and tok["fatal_mismatches"] == 0
    assert tok["identical"] >= tok["texts"] - 3  # llama.cpp splits a few rare symbols differently (see parity.py)
    assert result["perplexity"]["tokens"] >= 300 and result["perplexity"]["value"] > 1
    assert "logits" not in result
    assert result["runtime"]["completion_tokens"] > 0
    assert result["runtime"]["finish_reason"] == "length"  # a random model does not stop within 8 tokens
    problems = verify.judge(result, "Q4_K_M", verify.Limits(smoke_max_tokens=8), reference_ppl=None)
    assert "did not stop at the end-of-turn token within 8 tokens" in problems
    assert verify.judge(result, "Q4_K_M", verify.Limits(require_answer=False), reference_ppl=None) == []


def sample_result(**changes) -> dict:
    result = {"tokenizer": {"texts": 250, "identical": 250, "mismatches": 0, "fatal_mismatches": 0, "examples": []},
              "logits": {"top1_agreement": 0.998, "max_abs_logit_diff": 0.2}, "perplexity": {"value": 21.0},
              "runtime": {"text": "The pancreas.", "finish_reason": "stop"}}
    for key, value in changes.items():
        result[key] = {**result[key], **value}
    return result


def test_judge_turns_numbers_into_problems():
    limits = verify.Limits()
    assert verify.judge(sample_result(), "F16", limits, None) == []
    low = verify.judge(sample_result(logits={"top1_agreement": 0.95}), "F16", limits, None)
    assert low == ["top-1 agreement with the HF model is 95.00% < 99% (max |logit diff| 0.2)"]
    ok = sample_result(perplexity={"value": 22.0})
    assert verify.judge(ok, "Q4_K_M", limits, reference_ppl=20.0) == []
    assert ok["perplexity"]["relative_to_float"] == pytest.approx(0.1)
    broken = verify.judge(sample_result(perplexity={"value": 900.0}), "Q4_K_M", limits, reference_ppl=20.0)
    assert len(broken) == 1 and "the quantized file is broken" in broken[0]
    bad_tok = sample_result(tokenizer={"mismatches": 2, "fatal_mismatches": 1,
                                       "examples": [{"text": "<|im_end|>x", "fatal": True}]})
    assert "tokenizer: llama.cpp and HF ids differ on 1 ASCII or special-token text(s)" in \
        verify.judge(bad_tok, "F16", limits, None)[0]
    rare = sample_result(tokenizer={"mismatches": 2, "fatal_mismatches": 0})
    assert verify.judge(rare, "F16", limits, None) == []
    empty = verify.judge(sample_result(runtime={"text": " ", "finish_reason": "length"}), "F16", limits, None)
    assert empty == ["empty answer", "did not stop at the end-of-turn token within 512 tokens"]


@pytest.fixture(scope="module")
def smollm2_f16(smollm2_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("smollm2") / "smollm2-fp16.gguf"
    gguf.convert(smollm2_dir, path)
    return path


def test_smollm2_f16_matches_the_hf_model(smollm2_f16, smollm2_dir):
    result = verify.run_parity(smollm2_f16, smollm2_dir, "Which organ produces insulin? Answer in one sentence.",
                               max_tokens=128, logits=True)
    tok = result["tokenizer"]
    assert tok["fatal_mismatches"] == 0 and tok["identical"] >= 200
    assert result["logits"]["positions"] >= parity.LOGIT_POSITIONS
    assert result["logits"]["top1_agreement"] >= 0.99
    assert 0 < result["logits"]["max_abs_logit_diff"] < 2
    ppl = result["perplexity"]
    assert ppl["value"] == pytest.approx(ppl["hf"], rel=0.01)  # F16 costs the model nothing measurable
    assert "pancrea" in result["runtime"]["text"].lower() and result["runtime"]["finish_reason"] == "stop"
    assert verify.judge(result, "F16", verify.Limits(), None) == []


KILLABLE_EXPORT = """
import json, sys
from medtune.artifacts import RunDir, write_manifest
from medtune.config import Config
from medtune.export import stage, verify
from medtune.ui import UI

cfg = Config.model_validate(json.loads(sys.argv[1]))
run_dir = RunDir(cfg.run_dir)
# A random model neither agrees with itself at 99% top-1 in F16 nor answers and stops: relax those checks only.
limits = verify.Limits(min_top1_agreement=0.0, smoke_max_tokens=8, require_answer=False)
with run_dir.atomic("gguf") as out:  # as medtune.pipeline.run_stage does
    results = stage.run(cfg, run_dir, out, UI(), limits=limits)
    write_manifest(out, "export", "test", {}, results)
"""


def write_prepared(folder: Path, tokenizer, n_train: int = 24, n_val: int = 4) -> None:
    """A prepared/ folder as the data stage writes it: chat-rendered conversations' ids per split."""
    import numpy as np
    from conftest import reasonmed_record

    folder.mkdir(parents=True)
    for split, records in (("train", range(n_train)), ("val", range(100, 100 + n_val))):
        rows = []
        for i in records:
            r = reasonmed_record(i)
            messages = [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
            rows.append(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
        np.save(folder / f"{split}.ids.npy", np.concatenate(rows).astype(np.int32))
        np.save(folder / f"{split}.mask.npy", np.ones(sum(map(len, rows)), dtype=np.uint8))
        np.save(folder / f"{split}.offsets.npy", np.cumsum([0, *map(len, rows)]).astype(np.int64))
    write_manifest(folder, "data", "test", {}, {})


def test_a_killed_export_leaves_nothing_final_and_the_next_run_finishes(tmp_path, tiny_base, smollm2_tokenizer):
    run_dir = RunDir(tmp_path / "run")
    shutil.copytree(tiny_base, run_dir / "merged")
    write_manifest(run_dir / "merged", "merge", "test", {}, {})
    write_prepared(run_dir / "prepared", smollm2_tokenizer)
    cfg = {"name": "tiny", "run_dir": str(run_dir.root), "base": {"model": str(tiny_base)},
           "data": {"path": str(tmp_path / "unused.jsonl")},
           "export": {"name": "tiny", "types": ["F16", "Q8_0", "Q4_K_M"]},
           "chat": {"temperature": 0.3, "top_p": 0.85}}
    cmd = [sys.executable, "-c", KILLABLE_EXPORT, json.dumps(cfg)]

    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(run_dir.root.glob(".gguf.*.partial/*.gguf")):  # kill once the first GGUF is being written
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the export wrote no GGUF within 120 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the stage and its converter/quantizer children
    proc.wait()

    assert not (run_dir / "gguf").exists()
    finals = [p for p in run_dir.root.rglob("*") if p.is_file() and not any(
        part.endswith(".partial") for part in p.relative_to(run_dir.root).parts)]
    assert not [p for p in finals if p.suffix == ".gguf" or p.name in ("Modelfile", "README.md")]

    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list(run_dir.root.glob(".gguf.*"))  # the killed run's leftovers are gone
    names = sorted(p.name for p in (run_dir / "gguf").iterdir())
    assert names == ["Modelfile", "README.md", "imatrix.gguf", "manifest.json", "tiny-Q4_K_M.gguf",
                     "tiny-Q8_0.gguf", "tiny-fp16.gguf"]
    manifest = json.loads((run_dir / "gguf" / "manifest.json").read_text())
    results = manifest["results"]
    assert results["problems"] == [] and set(results["files"]) == {"F16", "Q8_0", "Q4_K_M"}
    f16, q4 = results["files"]["F16"], results["files"]["Q4_K_M"]
    assert f16["logits"]["positions"] > 0 and "logits" not in q4
    assert "relative_to_float" in q4["perplexity"] and "relative_to_float" not in f16["perplexity"]
    assert f16["tokenizer"]["texts"] >= 200 and f16["metadata"]["problems"] == []
    # the importance matrix: llama-imatrix on the training conversations, used by Q4_K_M only
    matrix = results["imatrix"]
    assert matrix["used"] and matrix["source"].startswith("the training split") and matrix["file"] == "imatrix.gguf"
    assert matrix["conversations"] == 24 and matrix["tokens"] >= 1024 and matrix["chunks"] >= 2
    assert q4["imatrix"] and not results["files"]["Q8_0"]["imatrix"]
    # divergence from F16 on the validation conversations; the merged model is its base: nothing to retain
    div = results["divergence"]
    assert div["reference"] == "tiny-fp16.gguf" and div["text"].startswith("prepared/val: 4 of 4")
    assert div["base"]["mean_kld"] == pytest.approx(0.0, abs=1e-3) and div["positions"] > 100
    for t in ("Q8_0", "Q4_K_M"):
        d = results["files"][t]["divergence"]
        assert d["positions"] == div["positions"] and 0 <= d["mean_kld"] <= d["p99_kld"] <= d["max_kld"]
        assert 0 < d["same_top"] <= 1 and "ppl_diff" in d
    assert results["files"]["Q8_0"]["divergence"]["mean_kld"] < q4["divergence"]["mean_kld"]
    assert q4["fallback"] == {"matrices": q4["fallback"]["matrices"], "fallback": 0, "fallback_types": {},
                              "most": False}  # 256-wide rows: no K-quant falls back
    chosen = results["recommended"]
    assert chosen["type"] in results["files"] and results["ollama"]["from"] == chosen["file"]
    modelfile = (run_dir / "gguf" / "Modelfile").read_text().splitlines()
    assert "PARAMETER temperature 0.3" in modelfile and "PARAMETER top_p 0.85" in modelfile  # the config's chat
    assert {f["path"] for f in manifest["files"]} >= {"tiny-fp16.gguf", "Modelfile", "README.md"}
    card = (run_dir / "gguf" / "README.md").read_text()
    assert "not a medical device" in card and "see the base model card" in card and "Apache-2.0" in card
    assert "Not available when these files were written" in card
    assert f"**Recommended file: `{chosen['file']}`**" in card and f"FROM ./{chosen['file']}" in modelfile


def test_model_card_names_licences_numbers_and_the_disclaimer(tmp_path):
    from medtune import DISCLAIMER
    from medtune.artifacts import atomic_write_json
    from medtune.config import Config
    from medtune.export import card

    run_dir = RunDir(tmp_path / "run")
    atomic_write_json(run_dir / "prepared" / "report.json", {"records_read": 1000, "used": 990, "rejected": 10,
                                                             "train_rows": 980, "val_rows": 10, "over_max_len": 300,
                                                             "max_len": 512, "truncated_answer_cut": 250})
    atomic_write_json(run_dir / "adapter" / "train_report.json", {
        "steps": 180, "device": "cuda:0", "precision": "bf16", "final_loss": 0.91234, "val_loss_before": 1.8,
        "val_loss_after": 0.95, "tokens_per_s": 41000.0})
    cfg = Config.model_validate({
        "name": "ref", "run_dir": str(run_dir.root), "base": {"model": "meta-llama/Llama-3.2-1B-Instruct"},
        "data": {"dataset": "lingshu-medical-mllm/ReasonMed", "data_file": "ReasonMed.json"},
        "export": {"name": "llama3.2-1b-medical"}})
    results = {"llama_cpp_version": "0.3.36", "ollama": {"from": "llama3.2-1b-medical-Q4_K_M.gguf"}, "files": {
        "F16": {"file": "llama3.2-1b-medical-fp16.gguf", **sample_result()},
        "Q4_K_M": {"file": "llama3.2-1b-medical-Q4_K_M.gguf",
                   **sample_result(perplexity={"value": 23.1, "relative_to_float": 0.1})}}}
    results["files"]["Q4_K_M"].pop("logits")
    text = card.model_card(cfg, run_dir, results)
    assert "Llama 3.2 Community License" in text and "Built with Llama" in text
    assert "ReasonMed" in text and "Apache-2.0" in text
    assert DISCLAIMER in text
    assert "990" in text and "250 of them lost their final answer" in text
    assert "validation loss 1.8 before and 0.95 after" in text
    assert "| `llama3.2-1b-medical-Q4_K_M.gguf` | Q4_K_M | 250/250 identical | - | 23.100 (+10.0%) | yes |" in text
    assert "99.80%" in text
    assert "Not available when these files were written" in text
