"""Cross-check medtune's cloze formulation against lm-evaluation-harness on the same MedQA items and prompt.

    python bench/lm_eval_crosscheck_cloze.py [--limit 200] [--lm-eval /work/lmeval-venv/bin/lm_eval] [--model DIR]

Both sides score the first `limit` questions of the local MedQA-USMLE 4-option test file with the same HF model
(default: SmolLM2-135M-Instruct, the demo's base, dequantized to float32) on the CPU, in the cloze formulation: no
options shown, each option's text the continuation " {text}" of "Question: ...\\nAnswer:". medtune's side is
`ClozeSolver` (`eval.mode: cloze`); lm-eval's side is the task `medqa_cloze_local` of bench/lm_eval_task/ (the same
prompt, lm-eval's own tokenization, scoring, `acc` and `acc_norm`). lm-eval lives in its own virtual environment:

    python3 -m venv /work/lmeval-venv && /work/lmeval-venv/bin/pip install torch==2.13.0 \\
        && /work/lmeval-venv/bin/pip install "transformers==5.24.0" lm-eval accelerate

With `--work DIR` each side keeps what it computed there (DIR/medtune.jsonl, DIR/lm_eval/) and a side already done
is read instead of run, so on a busy machine the two sides can run as separate processes at once:
`--work DIR --side medtune` and `--work DIR --side lm-eval`, then `--work DIR` compares them.

Writes bench/results/lm_eval_crosscheck_cloze.json: `n_items`, `agree_acc` and `agree_acc_norm` (shares of items
with the same prediction), `max_abs_loglik_diff` (over every option of every item), both sides' accuracies, the
exact commands, times and versions. Exits non-zero when agreement is under 99.5% or a log-likelihood differs by more
than 1e-3.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from lm_eval_crosscheck import (
    MEDQA,
    ROOT,
    SMOLLM2,
    TASK_DIR,
    env_versions,
    lm_eval_command,
    read_lm_eval,
    run_lm_eval,
)

from medtune.artifacts import atomic_write_json, atomic_write_text
from medtune.evaluate.benchmarks import load_benchmark
from medtune.evaluate.loglik import LoglikScorer
from medtune.evaluate.runner import ClozeSolver
from medtune.models import load_hf, resolve_base

TASK = "medqa_cloze_local"
MIN_AGREEMENT = 0.995
MAX_LOGLIK_DIFF = 1e-3


def medtune_side(model_dir: str, limit: int, batch_size: int, kept: Path | None) -> dict[str, dict[str, object]]:
    """{item id: the ClozeSolver record} for the first `limit` items (read from `kept` when it holds them)."""
    if kept is not None and kept.is_file():
        return {r["id"]: r for r in map(json.loads, kept.read_text().splitlines())}
    items = load_benchmark("medqa", MEDQA)[:limit]
    model, tokenizer = load_hf(model_dir, device="cpu")
    records = ClozeSolver(LoglikScorer(model, tokenizer, batch_size), "medqa").solve(items)
    if kept is not None:
        atomic_write_text(kept, "".join(json.dumps(r) + "\n" for r in records))
    return {record["id"]: record for record in records}


def lm_eval_side(command: list[str], output: Path) -> tuple[dict[str, float], dict[str, dict[str, object]]]:
    """lm-eval's {acc, acc_norm} and, per realidx, its per-option log-likelihoods and its two predictions (read
    from `output` when an earlier run of the same command left its results there)."""
    done = any(output.rglob("results_*.json")) if output.is_dir() else False
    results, samples = read_lm_eval(output, TASK) if done else run_lm_eval(command, output, TASK)
    per_item = {}
    for sample in samples:
        scores = {letter: float(resp[0]) for letter, resp in zip("ABCD", sample["filtered_resps"])}
        gold = sample["doc"]["answer_idx"]
        per_item[str(sample["doc"]["realidx"])] = {
            "logprobs": scores,
            # lm-eval logs per item only whether its two predictions were right, not the predictions themselves
            "acc": sample["acc"], "acc_norm": sample["acc_norm"], "gold": gold}
    return {k: results["results"][TASK][f"{k},none"] for k in ("acc", "acc_norm")}, per_item


def compare(ours: dict[str, dict[str, object]], theirs: dict[str, dict[str, object]]) -> dict[str, object]:
    """Per-item agreement of the predictions (acc, acc_norm) and the largest per-option log-likelihood gap.

    lm-eval's sample log gives its log-likelihoods, so its predictions are recomputed from them exactly as lm-eval
    does (argmax; argmax of the log-likelihood over the option's length in characters); that they reproduce lm-eval's
    own per-item acc and acc_norm is checked too (`lm_eval_self_consistent`)."""
    import numpy as np

    agree_acc = agree_norm = consistent = 0
    max_diff = 0.0
    for item_id, mine in ours.items():
        other = theirs[item_id]
        lls = np.array([other["logprobs"][k] for k in "ABCD"])
        lengths = np.array([float(len(mine["options"][k])) for k in "ABCD"])
        pred, pred_norm = "ABCD"[int(np.argmax(lls))], "ABCD"[int(np.argmax(lls / lengths))]
        consistent += (pred == other["gold"]) == bool(other["acc"]) and \
            (pred_norm == other["gold"]) == bool(other["acc_norm"])
        agree_acc += pred == mine["extracted"]
        agree_norm += pred_norm == mine["extracted_norm"]
        max_diff = max(max_diff, *(abs(mine["logprobs"][k] - other["logprobs"][k]) for k in "ABCD"))
    n = len(ours)
    return {"agree_acc": agree_acc / n, "agree_acc_norm": agree_norm / n, "max_abs_loglik_diff": max_diff,
            "lm_eval_self_consistent": consistent == n}


def timed(work: Path | None, side: str, run: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one side: the seconds measured now, or as measured when the side ran in its own process
    (`work`/seconds_*.json; `run` then only reads its kept results)."""
    kept = work / f"seconds_{side}.json" if work else None
    start = time.perf_counter()
    result = run()
    if kept is not None and kept.is_file():
        return json.loads(kept.read_text())["seconds"], result
    seconds = round(time.perf_counter() - start, 1)
    if kept is not None:
        atomic_write_text(kept, json.dumps({"seconds": seconds}))
    return seconds, result


def medtune_version() -> str:
    """The installed medtune's version, or the source tree's commit when it runs from `src/` (PYTHONPATH)."""
    try:
        return version("medtune")
    except PackageNotFoundError:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return f"source tree {commit.stdout.strip()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=200, help="the first N questions of the file (default 200)")
    parser.add_argument("--lm-eval", default="/work/lmeval-venv/bin/lm_eval", help="the lm_eval script of its venv")
    parser.add_argument("--model", default=None, help="an HF model directory (default: the demo's SmolLM2)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lm_eval_crosscheck_cloze.json")
    parser.add_argument("--work", type=Path, default=None, help="keep each side's results here; reuse them")
    parser.add_argument("--side", choices=["medtune", "lm-eval"], default=None, help="run only this side (--work)")
    args = parser.parse_args()

    model_dir = args.model or resolve_base(SMOLLM2)
    seconds = {}
    if args.side in (None, "medtune"):
        seconds["medtune"], ours = timed(args.work, "medtune", lambda: medtune_side(
            model_dir, args.limit, args.batch_size, args.work / "medtune.jsonl" if args.work else None))
    with tempfile.TemporaryDirectory() as tmp:
        output = args.work / "lm_eval" if args.work else Path(tmp)
        command = lm_eval_command(args.lm_eval, model_dir, args.limit, args.batch_size, output, TASK)
        if args.side in (None, "lm-eval"):
            seconds["lm_eval"], (lm_eval_acc, theirs) = timed(args.work, "lm_eval", lambda: lm_eval_side(command,
                                                                                                         output))
    if args.side is not None:
        return
    if set(theirs) != set(ours):
        sys.exit(f"the two sides scored different items: {sorted(set(ours) ^ set(theirs))[:10]}")
    n = len(ours)
    result = {
        "benchmark": f"MedQA-USMLE 4 options, first {n} items of {MEDQA.relative_to(ROOT.parent)}",
        "formulation": "cloze: 'Question: {question}\\nAnswer:' + ' {option text}'; acc (sum), acc_norm (per char)",
        "model": SMOLLM2 if args.model is None else args.model, "model_dir": model_dir, "dtype": "float32",
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "n_items": n,
        **compare(ours, theirs),
        "medtune_acc": sum(bool(r["correct"]) for r in ours.values()) / n,
        "medtune_acc_norm": sum(bool(r["correct_norm"]) for r in ours.values()) / n,
        "lm_eval_acc": lm_eval_acc["acc"], "lm_eval_acc_norm": lm_eval_acc["acc_norm"],
        "targets": {"agreement": MIN_AGREEMENT, "max_abs_loglik_diff": MAX_LOGLIK_DIFF},
        "lm_eval_command": "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 "
                           + shlex.join(command).replace(shlex.quote(str(output)), "OUT"),
        "lm_eval_task": str((TASK_DIR / f"{TASK}.yaml").relative_to(ROOT)),
        "medtune_command": f"python bench/lm_eval_crosscheck_cloze.py --limit {args.limit} "
                           f"--batch-size {args.batch_size}" + (" --work DIR (each side as its own process, at "
                                                                "once, then compared)" if args.work else ""),
        "seconds": seconds,
        "versions": {"medtune_env": {"python": sys.executable, "medtune": medtune_version(),
                                     **{p: version(p) for p in ("torch", "transformers")}},
                     "lm_eval_env": env_versions(str(Path(args.lm_eval).with_name("python")))},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))
    if min(result["agree_acc"], result["agree_acc_norm"]) < MIN_AGREEMENT or \
            result["max_abs_loglik_diff"] > MAX_LOGLIK_DIFF:
        sys.exit("medtune's cloze scores and lm-eval's disagree beyond the targets")


if __name__ == "__main__":
    main()
