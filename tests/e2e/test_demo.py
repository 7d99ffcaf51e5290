"""The demo chain end to end on SmolLM2-135M-Instruct (minutes on a CPU), asserting on what it produced."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import medtune

from medtune.answers import final_answer
from medtune.config import load_config

ROOT = Path(__file__).resolve().parents[2]
MODEL_FILES = "smollm2-135m-medical-demo-*.gguf"  # the model files (gguf/ also holds imatrix.gguf)
pytestmark = pytest.mark.e2e


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_summary_lists_artifacts_and_a_sample_answer(demo_run):
    run_dir, proc = demo_run
    for stage in ("data", "train", "merge", "export", "eval"):
        assert f"{stage}: running" in proc.stdout
    export = json.loads((run_dir / "gguf" / "manifest.json").read_text())["results"]
    chosen = export["recommended"]
    assert chosen["file"] in {r["file"] for r in export["files"].values() if r["stops"]}
    assert f"Use {chosen['file']}" in proc.stdout and f"Sample answer from {chosen['file']}" in proc.stdout
    # the demo's tuning is large next to what a file loses: every quantized file's numbers are in the summary
    assert export["imatrix"]["used"] and "mean KLD" in proc.stdout and "tuning kept" in proc.stdout
    for t in ("Q8_0", "Q5_K_M", "Q4_K_M"):
        d = export["files"][t]["divergence"]
        assert d["positions"] == export["divergence"]["positions"] > 500 and 0 < d["mean_kld"] < 1
        assert d["retention"] is not None and export["divergence"]["base"]["mean_kld"] > d["mean_kld"]
    assert export["files"]["Q4_K_M"]["fallback"]["most"]  # SmolLM2's 576-wide rows: most matrices fall back
    assert "smollm2-135m-medical-demo-Q4_K_M.gguf" in proc.stdout and " MB " in proc.stdout
    assert "not a medical device" in proc.stdout


def test_data_report_counts_add_up(demo_run):
    report = json.loads((demo_run[0] / "prepared" / "report.json").read_text())
    assert report["records_read"] == 100 == report["used"] + report["rejected"]
    assert report["end_of_turn_token"] == "<|im_end|>" and report["pad_token"] != "<|im_end|>"
    assert report["truncated_answer_cut"] <= report["truncated"] == report["over_max_len"]


def test_training_lowered_validation_loss(demo_run):
    report = json.loads((demo_run[0] / "adapter" / "train_report.json").read_text())
    assert report["steps"] == load_config(ROOT / "configs" / "demo.yaml").train.max_steps
    assert report["val_loss_after"] < report["val_loss_before"]


def test_every_gguf_loads_answers_and_stops_at_end_of_turn(demo_run):
    """Each file answers; one that does not end its turn (after its own answer, or right after a finished one) is
    one export's manifest flags, and the recommended file is one that does."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from medtune.export.parity import AFTER_ANSWER_TOKENS, FINISHED_ANSWER, STOP_PROBE

    gguf_dir = demo_run[0] / "gguf"
    names = sorted(p.name for p in gguf_dir.glob(MODEL_FILES))
    assert names == [f"smollm2-135m-medical-demo-{t}.gguf" for t in ("Q4_K_M", "Q5_K_M", "Q8_0", "fp16")]
    results = json.loads((gguf_dir / "manifest.json").read_text())["results"]
    verdict = {entry["file"]: entry["stops"] for entry in results["files"].values()}
    finished = (AutoTokenizer.from_pretrained(demo_run[0] / "merged").apply_chat_template(
        [{"role": "user", "content": STOP_PROBE}], tokenize=False, add_generation_prompt=True) + FINISHED_ANSWER)
    for name in names:
        llm = Llama(model_path=str(gguf_dir / name), n_ctx=2048, verbose=False)
        out = llm.create_chat_completion([{"role": "user", "content": STOP_PROBE}], temperature=0.0,
                                         max_tokens=768)
        choice = out["choices"][0]
        assert choice["message"]["content"].strip(), name
        assert "<|im_end|>" not in choice["message"]["content"]
        after = llm.create_completion(finished, temperature=0.0, max_tokens=AFTER_ANSWER_TOKENS)["choices"][0]
        stops = choice["finish_reason"] == "stop" and after["finish_reason"] == "stop"
        # a file that does not end its turn here is one export flagged (and so does not recommend)
        assert stops or not verdict[name], (name, choice["message"]["content"][-300:], after["text"])
    assert verdict["smollm2-135m-medical-demo-fp16.gguf"]  # a float file that does not stop fails the export
    assert verdict[results["recommended"]["file"]], results["recommended"]


def test_tensor_types_match_file_names(demo_run):
    import llama_cpp
    from gguf import GGUFReader

    expected_main = {"fp16": "F16", "Q8_0": "Q8_0", "Q5_K_M": "Q5_K", "Q4_K_M": "Q4_K"}
    ftype = {"fp16": "F16", "Q8_0": "Q8_0", "Q5_K_M": "Q5_K_M", "Q4_K_M": "Q4_K_M"}
    for path in (demo_run[0] / "gguf").glob(MODEL_FILES):
        suffix = path.stem.rsplit("-", 1)[1]
        reader = GGUFReader(path)
        field = reader.fields["general.file_type"]
        assert int(field.parts[field.data[0]][0]) == getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype[suffix]}")
        matrix_types = {t.tensor_type.name for t in reader.tensors if len(t.shape) > 1}
        assert expected_main[suffix] in matrix_types
        if suffix in ("fp16", "Q8_0"):
            assert matrix_types == {expected_main[suffix]}
    manifest = json.loads((demo_run[0] / "gguf" / "manifest.json").read_text())
    assert manifest["results"]["problems"] == []
    assert {f["path"] for f in manifest["files"]} >= {p.name for p in (demo_run[0] / "gguf").glob("*.gguf")}
    assert (demo_run[0] / "gguf" / "imatrix.gguf").is_file()  # the importance matrix the K-quants were made with


def test_eval_table(demo_run):
    summary = json.loads((demo_run[0] / "eval" / "summary.json").read_text())
    for model in ("base", "Q4_K_M"):
        result = summary["models"][model]["medqa-sample"]
        assert result["n"] == 8
        assert 0 <= result["ci95"][0] <= result["accuracy"] <= result["ci95"][1] <= 1
    text = (demo_run[0] / "eval" / "results.md").read_text()
    assert "| Q4_K_M | medqa-sample | 8 |" in text
    # the score of always giving the keys' most common letter, and each model's answer shares, beside the scores
    constant = summary["always_most_common_answer"]["medqa-sample"]
    assert constant["n"] == 8 and f"| always the most common answer | {constant['accuracy']:.1%}" in text
    for model in ("base", "Q4_K_M"):
        shares = summary["models"][model]["medqa-sample"]["answer_shares"]
        assert set(shares) == {"A", "B", "C", "D", "none"}
        assert sum(shares.values()) == pytest.approx(1, abs=1e-3)


def test_tuned_model_learned_the_answer_format(demo_run):
    """The tuned file ends its answers the way the training data does, and loses no more answers than the base."""
    run_dir, proc = demo_run
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    base, tuned = (summary["models"][m]["medqa-sample"] for m in ("base", "Q4_K_M"))
    assert tuned["extraction_failures"] <= base["extraction_failures"]
    records = read_jsonl(run_dir / "eval" / "Q4_K_M" / "medqa-sample.jsonl")
    last_lines = [r["output"].strip().splitlines()[-1] if r["output"].strip() else "" for r in records]
    explicit = [line for line in last_lines if re.fullmatch(r"The answer is [A-E]\.", line.strip())]
    assert len(explicit) >= 6, last_lines  # of 8: the final line of the training data, "The answer is X."
    sample = json.loads((run_dir / "gguf" / "manifest.json").read_text())["results"]["files"]["Q4_K_M"]
    assert final_answer(sample["runtime"]["text"], load_config(ROOT / "configs" / "demo.yaml").export.check_prompt)
    assert "answers without an extractable letter: base" in proc.stdout


def test_loglik_view_of_base_and_merged(demo_run):
    run_dir, proc = demo_run
    summary = json.loads((run_dir / "eval" / "loglik" / "summary.json").read_text())
    # the option texts' log-likelihood (cloze), reported by acc_norm: the formulation a 135M model can be measured in
    assert summary["mode"] == "cloze" and list(summary["models"]) == ["base", "merged"]
    for per_model in summary["models"].values():
        result = per_model["medqa-sample"]
        assert result["n"] == 8 and result["extraction_failures"] == 0 and result["formulation"] == "cloze-norm"
        assert set(result["answer_shares"]) >= {"A", "B", "C", "D", "none"}
    assert {(r["model"], r["formulation"]) for r in summary["rows"]} == \
        {(m, f) for m in ("base", "merged") for f in ("cloze", "cloze-norm")}
    assert summary["always_most_common_answer"]["medqa-sample"]["n"] == 8
    # the same 8 items in both views
    generated = read_jsonl(run_dir / "eval" / "base" / "medqa-sample.jsonl")
    scored = read_jsonl(run_dir / "eval" / "loglik" / "merged" / "medqa-sample.jsonl")
    assert {r["id"] for r in scored} == {r["id"] for r in generated}
    assert "log-likelihood of the options" in proc.stdout


def test_second_run_does_no_work(demo_run):
    run_dir, _ = demo_run
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and "eval_cache" not in p.parts}
    proc = medtune("run", "configs/demo.yaml", "--set", f"run_dir={run_dir}", "--set", "eval.limit=8")
    assert proc.returncode == 0, proc.stderr
    for stage in ("data", "train", "merge", "export", "eval"):
        assert f"{stage}: up to date, skipped" in proc.stdout
    after = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and "eval_cache" not in p.parts}
    assert after == before
    assert "Sample answer from" in proc.stdout


def test_report_of_the_demo_in_chromium(demo_run, tmp_path):
    """report.html of the demo: printed at the end, no console error in headless Chromium at desktop and phone
    widths, nothing fetched, and the eval table, data counts and export checks it shows equal the run's files."""
    from browser import DESKTOP, PHONE, check_numbers, open_report, require_chromium

    run_dir, proc = demo_run
    report = run_dir / "report.html"
    assert str(report) in proc.stdout.replace("\n", "")
    require_chromium()
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    for name, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
        page = open_report(report, viewport, tmp_path / f"{name}.png")
        assert page.console_errors == [] and page.requests == [report.resolve().as_uri()], name
        assert page.page_width <= page.viewport_width, f"{name}: the page scrolls sideways"
        assert check_numbers(run_dir, page.values) == []
        sources = {v["src"] for v in page.values}
        for model in summary["models"]:
            assert f"eval/summary.json#models/{model}/medqa-sample/accuracy" in sources
        assert {"prepared/report.json#records_read", "prepared/report.json#used",
                "gguf/manifest.json#results/files/Q4_K_M/tokenizer/identical"} <= sources
    card = (run_dir / "gguf" / "README.md").read_text()
    assert "| Q4_K_M | medqa-sample |" in card and str(ROOT) not in card and str(run_dir) not in card
