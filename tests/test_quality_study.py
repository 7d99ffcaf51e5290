"""The quality study's training file (bench/quality_study.py data), its configs and its statistics."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, SHARED_DATA

from medtune.contamination import question_stem

spec = importlib.util.spec_from_file_location("quality_study", ROOT / "bench" / "quality_study.py")
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)

needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not beside the repository")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("study-data")
    return out, study.build_data(SHARED_DATA, out)


@needs_shared
def test_training_file_is_the_suggested_split_and_disjoint_from_evaluation(built) -> None:
    out, manifest = built
    records = [json.loads(line) for line in (out / "train.jsonl").read_text(encoding="utf-8").split("\n") if line]
    assert manifest["sources"] == {"cot/medical_cot_train.jsonl": 221, "pubmedqa/ori_pqal.json": 500,
                                   "medmcqa_dev/dev.json": 1367, "medagents_benchmark/afrimedqa/train.jsonl": 124}
    assert len(records) == manifest["records"] == 2212 - len(manifest["text_overlap_dropped"])
    assert len(manifest["text_overlap_dropped"]) < 10  # near-duplicate stems only, each listed with its match
    assert all(count == 0 for count in manifest["id_overlap_with_evaluation"].values())

    ids = {r["id"] for r in records}
    test_pmids = set(json.loads((SHARED_DATA / "pubmedqa" / "test_ground_truth.json").read_text()))
    eval_mcqa = {json.loads(line)["realidx"] for line in
                 (SHARED_DATA / "medagents_benchmark" / "medmcqa" / "test.jsonl").read_text().splitlines()}
    assert not ids & test_pmids and not ids & eval_mcqa
    assert len(ids) == len(records)

    # Checked again from the written file, as the data stage sees it: no training stem matches an evaluation item.
    guard, _ = study.evaluation_guard(SHARED_DATA)
    assert not [r["id"] for r in records if guard.check(question_stem(r["instruction"]))]

    dev = {json.loads(line)["id"]: json.loads(line) for line in
           (SHARED_DATA / "medmcqa_dev" / "dev.json").read_text().splitlines()}
    for record in records:
        letter = re.fullmatch(r"(?s).*The answer is ([A-E])\.", record["output"]).group(1)
        if record["source"] == "medmcqa_dev/dev.json":  # cop is 1-based in the original release
            assert letter == "ABCD"[dev[record["id"]]["cop"] - 1]
            assert record["instruction"].endswith(f"D. {dev[record['id']]['opd']}")
    assert manifest["with_explanation"] == sum(not r["output"].startswith("The answer is") for r in records)
    assert sorted(p.name for p in (out / "eval").iterdir()) == sorted(n for _, n in study.EVAL_FILES.values())


def test_study_configs_share_the_data_and_recipe_across_bases() -> None:
    configs = {p.stem: yaml.safe_load(p.read_text()) for p in (ROOT / "configs" / "study").glob("*.yaml")}
    assert set(configs) == {f"{b}-{k}" for b in study.BASES for k in ("sft", "rpo")}
    for base, (spec, template, _) in study.BASES.items():
        sft, rpo = configs[f"{base}-sft"], configs[f"{base}-rpo"]
        assert sft["base"]["model"] == spec and sft["base"].get("chat_template") == template
        assert rpo["base"]["model"] == f"../../runs/study/{base}-sft-balanced-s1/merged"
        assert sft["data"]["balance_letters"] is True and rpo["pairs"]["balance_letters"] is True
        # the same data and recipe for both bases: only the chat markers' rows differ (Gemma's base never saw them)
        assert sft["data"] == configs["smollm2-sft"]["data"]
        assert {k: v for k, v in sft["train"]["lora"].items() if not k.startswith("trainable")} == \
            configs["smollm2-sft"]["train"]["lora"]
    for base in study.BASES:
        plans = {v: study.variant_plan(base, v) for v in study.TUNED}
        assert plans["sft-unbalanced-s1"][1][-1] == "data.balance_letters=false"
        assert "data.balance_letters=false" not in plans["sft-balanced-s2"][1]
        assert {config.removesuffix(".yaml") for config, _, _ in plans.values()} == {f"{base}-sft", f"{base}-rpo"}


def _summary(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"limit": None, "always_most_common_answer": {
        "medqa": {"answer": "A", "letter": "A", "accuracy": 0.3, "n": 200}}, "rows": rows}))


def _row(model: str, formulation: str, accuracy: float, p_first: float | None, p_constant: float,
         shares: dict | None = None) -> dict:
    return {"model": f"runs/study/smollm2-models/{model}", "benchmark": "medqa", "formulation": formulation,
            "n": 200, "accuracy": accuracy, "ci95": [accuracy - 0.05, accuracy + 0.05],
            "answer_shares": shares or {"A": 0.25, "B": 0.25, "C": 0.25, "D": 0.25, "none": 0.0},
            "gold_shares": {"A": 0.3, "B": 0.25, "C": 0.25, "D": 0.2}, "rstd": 3.0, "constant_accuracy": 0.3,
            "mcnemar_p_vs_constant": p_constant, "mcnemar_p_vs_first": p_first}


def test_report_names_each_row_and_checks_the_targets(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(study, "STUDY", tmp_path)
    monkeypatch.setattr(study, "DATA", tmp_path / "data")
    _summary(tmp_path / "smollm2-eval" / "cloze" / "summary.json", [
        _row("base", "cloze-norm", 0.30, None, 1.0),
        _row("sft-balanced-s1", "cloze-norm", 0.40, 0.001, 0.002),   # beats base and the constant answer
        _row("sft-unbalanced-s1", "cloze-norm", 0.36, 0.01, 0.2),   # beats base, not the constant answer
    ])
    _summary(tmp_path / "smollm2-eval" / "generate" / "summary.json", [
        _row("base", "generate", 0.28, None, 0.5),
        _row("sft-balanced-s1", "generate", 0.31, 0.3, 0.9, {"A": 0.5, "B": 0.2, "C": 0.2, "D": 0.1, "none": 0}),
    ])
    result = study.report("test")
    rows = {(r["variant"], r["formulation"]): r for r in result["results"]}
    assert set(rows) == {("smollm2-base", "cloze-norm"), ("smollm2-sft-balanced-s1", "cloze-norm"),
                         ("smollm2-sft-unbalanced-s1", "cloze-norm"), ("smollm2-base", "generate"),
                         ("smollm2-sft-balanced-s1", "generate")}
    row = rows[("smollm2-sft-balanced-s1", "cloze-norm")]
    assert row["base_model"] == "smollm2" and row["mcnemar_p_vs_base"] == 0.001
    assert row["always_most_common_answer"]["answer"] == "A"
    targets = result["targets"]
    # one benchmark is not two: the target needs wins on two held-out sets
    assert targets["significant_wins_over_base"] == {"smollm2-sft-balanced-s1 cloze-norm": ["medqa"]}
    assert targets["met_on_two_benchmarks"] == []
    # the balanced variant answers "A" half the time against the keys' 30%: 20 points off
    assert targets["balanced_answer_shares"] == [{"variant": "smollm2-sft-balanced-s1", "benchmark": "medqa",
                                                  "max_gap_points": 20.0, "within_10_points": False}]
    assert targets["balanced_all_within_10_points"] is False
    table = study.markdown(result)
    assert "| smollm2 | sft-balanced-s1 | medqa | cloze-norm | 200 | 40.0 (35.0–45.0) | 30.0 | 0.001 | 0.002 |" in table


def test_variants_run_side_by_side_and_rpo_waits_for_its_base(tmp_path, monkeypatch) -> None:
    """Variants side by side; each base's rpo starts only once its sft-balanced-s1 merged model is written; a
    failed variant stops only itself (and what depends on it); stages done in an earlier call are skipped and
    their timings kept."""
    import threading

    monkeypatch.setattr(study, "STUDY", tmp_path / "study")
    calls, lock = [], threading.Lock()

    def fake(stage, config, *sets, log, env=None):
        run_dir = [s for s in sets if s.startswith("run_dir=")]
        name = Path(run_dir[0].split("=", 1)[1]).name if run_dir else f"{Path(config).stem[:-4]}-rpo-balanced"
        with lock:
            calls.append((name, stage))
        if (name, stage) == ("gemma3-sft-balanced-s1", "train"):
            raise SystemExit("train failed")
        done = study.STUDY / name / study.FOLDERS[stage]
        done.mkdir(parents=True, exist_ok=True)
        (done / "manifest.json").write_text("{}")
        return 1.0

    monkeypatch.setattr(study, "medtune", fake)
    (study.STUDY / "smollm2-sft-balanced-s2" / "prepared").mkdir(parents=True)
    (study.STUDY / "smollm2-sft-balanced-s2" / "prepared" / "manifest.json").write_text("{}")
    (study.STUDY / "timings.json").write_text(json.dumps({"smollm2-sft-balanced-s2": {"data": 5.0}}))
    runs = [(b, v) for b in study.BASES for v in study.TUNED]
    study.train_variants(runs, tmp_path / "out", 0.0, None, jobs=8)
    assert calls.index(("smollm2-rpo-balanced", "pairs")) > calls.index(("smollm2-sft-balanced-s1", "merge"))
    assert [s for n, s in calls if n == "smollm2-rpo-balanced"] == ["pairs", "data", "train", "merge"]
    assert not [c for c in calls if c[0] == "gemma3-rpo-balanced"]  # its base failed: never started
    assert ("smollm2-sft-balanced-s2", "data") not in calls
    timings = json.loads((study.STUDY / "timings.json").read_text())
    assert timings["smollm2-sft-balanced-s2"]["data"] == 5.0 and timings["smollm2-sft-balanced-s2"]["merge"] == 1.0
    unbalanced = study.variant_plan("gemma3", "sft-unbalanced-s1")
    assert unbalanced == ("gemma3-sft.yaml", ["seed=1", "run_dir=../../runs/study/gemma3-sft-unbalanced-s1",
                                              "data.balance_letters=false"], ["data", "train", "merge"])
