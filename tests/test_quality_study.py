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
from medtune.evaluate.stats import mcnemar_exact

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


def test_study_configs_share_the_evaluation_and_the_base() -> None:
    configs = {p.stem: yaml.safe_load(p.read_text()) for p in (ROOT / "configs" / "study").glob("*.yaml")}
    assert set(configs) == {"base", "sft-seed", "sft-fast", "rpo"}
    first = configs["base"]["eval"]
    for name, cfg in configs.items():
        assert {k: v for k, v in cfg["eval"].items() if k not in ("models", "loglik_models")} == \
            {k: v for k, v in first.items() if k not in ("models", "loglik_models")}, name
        assert cfg["base"]["model"] == configs["base"]["base"]["model"] or name == "rpo"
    assert configs["rpo"]["base"]["model"].endswith("sft-fast-s1/merged")
    assert {study.variant_plan(v)[0].removesuffix(".yaml") for v in study.VARIANTS} == set(configs)


def _write(path: Path, correct: list[bool], extracted: str | None = "A") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": str(i), "correct": c, "extracted": extracted if c else None,
                                        "gold": extracted if c else "B"}) + "\n" for i, c in enumerate(correct)))


def test_report_pairs_each_variant_with_base_and_the_previous_one(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(study, "STUDY", tmp_path)
    monkeypatch.setattr(study, "DATA", tmp_path / "data")
    base = [True] * 10 + [False] * 30
    tuned = [False] * 2 + [True] * 8 + [True] * 12 + [False] * 18  # 2 lost, 12 gained
    _write(tmp_path / "base" / "eval" / "base-hf" / "medqa.jsonl", base)
    _write(tmp_path / "sft-seed" / "eval" / "merged" / "medqa.jsonl", tuned)
    _write(tmp_path / "sft-seed" / "eval" / "loglik" / "merged" / "medqa.jsonl", tuned)
    result = study.report({"base": "medtune eval configs/study/base.yaml"}, "test")
    rows = {(r["variant"], r["mode"]): r for r in result["results"]}
    assert rows[("base", "generate")]["accuracy"] == pytest.approx(0.25)
    assert rows[("base", "generate")]["mcnemar_p_vs_base"] is None
    seed = rows[("sft-seed", "generate")]
    assert seed["accuracy"] == pytest.approx(0.5)
    assert seed["extraction_failure_rate"] == pytest.approx(0.5)
    assert (seed["vs_base"]["only_reference"], seed["vs_base"]["only_this"]) == (2, 12)
    assert seed["mcnemar_p_vs_base"] == pytest.approx(mcnemar_exact(2, 12))
    assert seed["vs_previous"]["variant"] == "base"
    assert seed["ci_low"] < 0.5 < seed["ci_high"]
    assert ("sft-seed", "loglik") in rows and rows[("sft-seed", "loglik")]["mcnemar_p_vs_base"] is None  # no base
    assert "| sft-seed | medqa | generate | 40 | 50.0 (35.2–64.8) | 50.0% | 100.0 |" in study.markdown(result)
    assert seed["answer_shares"] == {"A": 0.5, "None": 0.5}
    # base's key: 10 items "A" (its right answers), 30 "B": always "B" scores 75%
    assert result["always_most_common_answer"]["medqa"] == {"answer": "B", "accuracy": 0.75, "n": 40}


def test_variants_run_side_by_side_and_rpo_waits_for_its_base(tmp_path, monkeypatch) -> None:
    """`gpu --jobs N --devices ...`: variants spread over the GPUs, rpo starts only once sft-fast-s1's merged model
    is written, a failed variant stops only itself (and what depends on it), stages done in an earlier call are
    skipped and their timings kept."""
    import threading

    monkeypatch.setattr(study, "STUDY", tmp_path / "study")
    monkeypatch.setattr(study, "pack", lambda out: None)
    calls, lock = [], threading.Lock()

    def fake(stage, config, *sets, log, env=None):
        run_dir = [s for s in sets if s.startswith("run_dir=")]
        variant = Path(run_dir[0].split("=", 1)[1]).name if run_dir else Path(config).stem
        with lock:
            calls.append((variant, stage, env["CUDA_VISIBLE_DEVICES"]))
        if (variant, stage) == ("sft-fast-s2", "train"):
            raise SystemExit("train failed")
        done = study.STUDY / variant / study.FOLDERS[stage]
        done.mkdir(parents=True, exist_ok=True)
        (done / "manifest.json").write_text("{}")
        return 1.0

    monkeypatch.setattr(study, "medtune", fake)
    (study.STUDY / "sft-fast-s3" / "prepared").mkdir(parents=True)
    (study.STUDY / "sft-fast-s3" / "prepared" / "manifest.json").write_text("{}")
    (study.STUDY / "timings.json").write_text(json.dumps({"sft-fast-s3": {"data": 5.0}}))
    study.run_gpu(["sft-fast-s1", "sft-fast-s2", "sft-fast-s3", "rpo"], tmp_path / "out", [], jobs=4,
                  devices=["0", "1"])
    order = [(v, s) for v, s, _ in calls]
    assert order.index(("rpo", "pairs")) > order.index(("sft-fast-s1", "merge"))
    assert ("sft-fast-s2", "merge") not in order and ("sft-fast-s3", "data") not in order
    assert {v: d for v, _, d in calls} == {"sft-fast-s1": "0", "sft-fast-s2": "1", "sft-fast-s3": "0", "rpo": "1"}
    timings = json.loads((study.STUDY / "timings.json").read_text())
    assert timings["sft-fast-s3"]["data"] == 5.0 and timings["sft-fast-s3"]["eval"] == 1.0
    assert [s for v, s in order if v == "rpo"] == ["pairs", "data", "train", "merge", "eval"]
    assert (study.STUDY / "rpo" / "eval" / "manifest.json").is_file()
