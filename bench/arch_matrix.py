"""Which architectures go through the whole chain: data, train, merge, export, chat, eval, each stage's checks.

    python bench/arch_matrix.py [--arch llama gemma3 qwen3] [--out bench/results/arch_matrix.json]

llama runs configs/demo.yaml (SmolLM2-135M-Instruct), gemma3 configs/gemma3-270m-demo.yaml (google/gemma-3-270m, a
base model given Gemma's chat template by config), qwen3 a random-weight Qwen3 (q_norm / k_norm; 2 layers) with
Qwen's real tokenizer as a base release has it (no chat template, eos <|endoftext|>), given ChatML by config
(tests/qwen_shape.py). Each stage runs in this process through the
pipeline's own runner; a stage that raises is recorded as failed with its message and the later stages are skipped.
A stage whose folder in --work is current for the same config is not run again: its manifest's results are read
("reused": true). A random-weight model cannot pass the checks only a trained model meets (F16 top-1 >= 99% against
itself, an answer that stops): its export runs with those relaxed, its chat and eval record numbers, not an answer's
quality.
Writes {"<arch>": {"<stage>": {"passed": bool, "seconds": float, ...its check numbers}}}.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # qwen_shape: the random Qwen3 the tests use
sys.path.insert(0, str(ROOT / "src"))
from medtune.export.parity import STOP_PROBE  # noqa: E402
from medtune.pipeline import STAGES as PIPELINE  # noqa: E402

CONFIGS = {"llama": ROOT / "configs" / "demo.yaml", "gemma3": ROOT / "configs" / "gemma3-270m-demo.yaml"}
QUESTION = STOP_PROBE  # the question export also asks every file (medtune.export.parity)


def _qwen3_config(work: Path) -> Path:
    import yaml
    from qwen_shape import build_model

    base = build_model(work / "qwen3-base", work / "qwen-cache", "qwen3", base=True)
    raw = yaml.safe_load(CONFIGS["llama"].read_text(encoding="utf-8"))
    raw.update(name="qwen3-random", base={"model": str(base), "chat_template": "chatml"})
    raw["export"]["name"] = "qwen3-random"
    raw["data"]["path"] = str((CONFIGS["llama"].parent / raw["data"]["path"]).resolve())
    for bench in raw["eval"]["benchmarks"]:
        bench["path"] = str((CONFIGS["llama"].parent / bench["path"]).resolve())
    raw["eval"].update(models=["Q4_K_M"], loglik_models=["merged"])
    path = work / "qwen3-random.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def _numbers(stage: str, results: dict[str, Any]) -> dict[str, Any]:
    """The check numbers of a stage's results, and whether they pass."""
    if stage == "data":
        return {"passed": results["used"] > 0 and results["truncated_answer_cut"] == 0, "used": results["used"],
                "train_rows": results["train_rows"], "train_tokens": results["train_tokens"],
                "end_of_turn_token": results["end_of_turn_token"]}
    if stage == "train":
        before, after = results.get("val_loss_before"), results.get("val_loss_after")
        finite = all(isinstance(v, float) and math.isfinite(v) for v in (before, after))
        return {"passed": finite, "steps": results["steps"], "precision": results["precision"],
                "val_loss_before": before, "val_loss_after": after, "lowered": finite and after < before}
    if stage == "merge":
        return {"passed": results["max_logit_diff"] < results["tolerance"], "dtype": results["dtype"],
                "max_logit_diff": results["max_logit_diff"], "tolerance": results["tolerance"],
                "adapter_max_logit_change": results["adapter_max_logit_change"]}
    if stage == "export":
        files = {}
        for gguf_type, r in results["files"].items():
            files[gguf_type] = {
                "problems": len(r["problems"]), "tokenizer_identical": f"{r['tokenizer']['identical']}/"
                f"{r['tokenizer']['texts']}", "chat_template_matches": r["metadata"]["chat_template_matches"],
                "perplexity": r["perplexity"]["value"], "ppl_change": r["perplexity"].get("relative_to_float"),
                "answer_finish": r["runtime"]["finish_reason"],
                **({"top1_agreement": r["logits"]["top1_agreement"]} if "logits" in r else {})}
        return {"passed": not results["problems"], "ollama_format": (results.get("ollama") or {}).get("format"),
                "files": files}
    if stage == "eval":
        models = {label: {name: {k: s[k] for k in ("n", "accuracy", "extraction_failures")}
                          for name, s in per.items()} for label, per in results["models"].items()}
        loglik = {label: {name: {k: s[k] for k in ("n", "accuracy")} for name, s in per.items()}
                  for label, per in results.get("loglik", {}).get("models", {}).items()}
        return {"passed": True, "generate": models, "loglik": loglik}
    raise ValueError(stage)


def _chat(gguf_dir: Path, trained: bool) -> dict[str, Any]:
    """One question to every exported file through llama.cpp with the GGUF's own chat template, greedy. A trained
    model passes when every file answers and stops; a random one when every file answers."""
    from llama_cpp import Llama

    files = {}
    for path in sorted(gguf_dir.glob("*.gguf")):
        llm = Llama(model_path=str(path), n_ctx=2048, verbose=False)
        out = llm.create_chat_completion([{"role": "user", "content": QUESTION}], temperature=0.0, max_tokens=256)
        choice = out["choices"][0]
        text = choice["message"]["content"]
        files[path.stem.rsplit("-", 1)[-1]] = {
            "answered": bool(text.strip()), "finish_reason": choice["finish_reason"],
            "completion_tokens": out["usage"]["completion_tokens"], "answer_tail": text.strip()[-80:]}
        del llm
    passed = all(f["answered"] and (f["finish_reason"] == "stop" or not trained) for f in files.values())
    return {"passed": bool(files) and passed, "files": files}


STAGES = ("data", "train", "merge", "export", "chat", "eval")


def run_arch(arch: str, work: Path, overrides: list[str], stages: tuple[str, ...] = STAGES) -> dict[str, Any]:
    from medtune.artifacts import RunDir, write_manifest
    from medtune.config import load_config
    from medtune.export import stage as export_stage
    from medtune.export import verify
    from medtune.pipeline import BY_NAME, run_stage, stage_fingerprint
    from medtune.ui import UI

    trained = arch != "qwen3"
    path = CONFIGS.get(arch) or _qwen3_config(work)
    cfg = load_config(path, [f"run_dir={work / arch}", *overrides])
    run, ui = RunDir(cfg.run_dir), UI()
    row: dict[str, Any] = {}
    for stage in stages:
        start = time.perf_counter()
        try:
            if stage == "chat":
                numbers = _chat(run / "gguf", trained)
            elif stage == "export" and not trained:
                limits = verify.Limits(min_top1_agreement=0.0, smoke_max_tokens=16, require_answer=False)
                with run.atomic("gguf") as out:  # as the pipeline's runner does, manifest included
                    results = export_stage.run(cfg, run, out, ui, limits=limits)
                    write_manifest(out, stage, stage_fingerprint(BY_NAME[stage], cfg, run), {}, results)
                numbers = _numbers(stage, results)
                numbers["limits"] = "random weights: top-1 and answer checks relaxed"
            elif run.is_current(BY_NAME[stage].folder, stage_fingerprint(BY_NAME[stage], cfg, run)):
                # an earlier run of this very config (same fingerprint) in --work: its recorded results
                numbers = {**_numbers(stage, run.manifest(BY_NAME[stage].folder)["results"]), "reused": True}
            else:
                numbers = _numbers(stage, run_stage(BY_NAME[stage], cfg, run, ui))
        except Exception as exc:  # noqa: BLE001 - recorded, and the chain stops here
            # every line: a verification failure names each file's problem on a line of its own
            row[stage] = {"passed": False, "error": " | ".join(
                          line.strip() for line in str(exc).strip().splitlines() if line.strip())[:1000],
                          "where": traceback.format_exc().strip().splitlines()[-1][:200]}
            break
        row[stage] = {**numbers, "seconds": round(time.perf_counter() - start, 1)}
        print(f"{arch} {stage}: {json.dumps(row[stage])[:300]}", flush=True)
    return row


def _cell(stage: str, r: dict[str, Any] | None) -> str:
    """One cell of the markdown matrix: pass / FAIL and the stage's main numbers."""
    if r is None:
        return "not run"
    if "error" in r:
        text = r["error"][:200]
    elif stage == "data":
        text = f"{r['train_rows']} rows, {r['train_tokens']} tok, ends {r['end_of_turn_token']}"
    elif stage == "train":
        text = f"{r['steps']} steps {r['precision']}, val loss {r['val_loss_before']:.3f} -> {r['val_loss_after']:.3f}"
    elif stage == "merge":
        text = f"max dlogit {r['max_logit_diff']:.1e} ({r['dtype']})"
    elif stage == "export":
        f16 = r["files"].get("F16", {})
        text = (f"tok {f16.get('tokenizer_identical')}, F16 top-1 {f16.get('top1_agreement', 0):.3f}, " + ", ".join(
            f"{t} ppl {f['perplexity']:.2f}/{f['answer_finish']}" for t, f in r["files"].items()))
    elif stage == "chat":
        text = ", ".join(f"{t} {f['finish_reason']} {f['completion_tokens']} tok" for t, f in r["files"].items())
    else:
        text = "; ".join(f"{m} {name} {s['accuracy']:.2f} (n {s['n']})" for kind in ("generate", "loglik")
                         for m, per in r[kind].items() for name, s in per.items())
    return f"{'pass' if r['passed'] else 'FAIL'}: {text}".replace("|", "\\|")  # <|im_end|> inside a table cell


def table(matrix: dict[str, Any]) -> str:
    """The matrix as the markdown table BENCHMARKS.md shows."""
    lines = ["| arch | " + " | ".join(STAGES) + " |", "|---" * (len(STAGES) + 1) + "|"]
    for arch, row in matrix.items():
        lines.append(f"| {arch} | " + " | ".join(_cell(s, row.get(s)) for s in STAGES) + " |")
    return "\n".join(lines)


def _write(out: Path, matrix: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    tmp.write_text(json.dumps(matrix, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["llama", "gemma3", "qwen3"], choices=["llama", "gemma3", "qwen3"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "arch_matrix.json")
    parser.add_argument("--work", type=Path, default=None, help="run directories (default: a temporary folder)")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES, help="the first N stages")
    parser.add_argument("--from-run", nargs=2, metavar=("ARCH", "RUN_DIR"), default=None,
                        help="record ARCH from the manifests an earlier run left in RUN_DIR (its stages are not run)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override for every arch")
    parser.add_argument("--table", action="store_true", help="print --out's matrix as a markdown table and stop")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="arch-matrix-"))
    matrix = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if args.from_run:
        arch, run_dir = args.from_run[0], Path(args.from_run[1])
        matrix[arch] = {}
        for step in PIPELINE[1:]:  # the chain without pairs
            manifest = run_dir / step.folder / "manifest.json"
            if manifest.is_file():
                matrix[arch][step.name] = {**_numbers(step.name, json.loads(manifest.read_text())["results"]),
                                       "from_run": str(run_dir)}
        args.arch = []
    for arch in args.arch:
        start = time.perf_counter()
        matrix[arch] = run_arch(arch, work, args.overrides, tuple(args.stages))
        matrix[arch]["_run"] = {"seconds": round(time.perf_counter() - start, 1), "date": time.strftime("%Y-%m-%d"),
                                "machine": f"{platform.machine()} {platform.processor() or ''} "
                                           f"{__import__('os').cpu_count()} cpus".strip(),
                                "overrides": args.overrides}
        _write(args.out, matrix)
    if args.from_run:
        _write(args.out, matrix)
    print(json.dumps({a: {s: r.get("passed") for s, r in row.items() if s != "_run"} for a, row in matrix.items()}))


if __name__ == "__main__":
    main()
