"""How much of the tuning each GGUF type keeps, quantized plainly and with an importance matrix from the training data.

For each trained run given (its merged/ and prepared/ folders; the stages before export are not run again), the
export stage runs twice, `export.imatrix=off` and `on`, into scratch folders, with every check export makes. Per
GGUF type and variant: mean and 99th-percentile KL divergence from the F16 file on the validation conversations,
same-top-token rate, retention (1 - KL(F16 || file) / KL(F16 || base)), perplexity difference, file size, seconds to
quantize, whether its answers stop, and the K-quant fallbacks.

    PYTHONPATH=src python bench/quant_quality.py demo=/tmp/qq/demo gemma3=/tmp/qq/gemma3
    python bench/quant_quality.py --table    # BENCHMARKS.md's table from the JSON

Raw JSON: bench/results/quant_quality.json, {"<config>": {"<type>": {"plain": {...}, "imatrix": {...}}}} (plus
"_run" per config: date, machine, command, the imatrix's own cost).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
CONFIGS = {"demo": ROOT / "configs" / "demo.yaml", "gemma3": ROOT / "configs" / "gemma3-270m-demo.yaml"}
VARIANTS = {"plain": "off", "imatrix": "on"}


def _file_numbers(r: dict[str, Any], base_kld: float | None) -> dict[str, Any]:
    from medtune.export.divergence import retention

    d = r.get("divergence") or {}
    kept = None if base_kld is None or d.get("mean_kld") is None else retention(d["mean_kld"], base_kld)
    return {"mean_kld": d.get("mean_kld"), "p99_kld": d.get("p99_kld"), "same_top": d.get("same_top"),
            "retention": kept, "ppl_diff": d.get("ppl_diff"), "size_bytes": r["bytes"],
            "seconds": r["seconds"], "stops": r["stops"], "imatrix": r.get("imatrix", False),
            "fallback": r.get("fallback"), "stop_problems": r.get("stop_problems", [])}


def export_variant(config: Path, run_dir: Path, setting: str, overrides: list[str]) -> dict[str, Any]:
    """One export of the run with export.imatrix=setting; its results, into a scratch folder removed after."""
    from rich.console import Console

    from medtune.artifacts import RunDir
    from medtune.config import load_config
    from medtune.export import stage
    from medtune.ui import UI

    cfg = load_config(config, [f"run_dir={run_dir}", f"export.imatrix={setting}", *overrides])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=f".quant-{setting}-") as out:
        results = stage.run(cfg, RunDir(run_dir), Path(out), UI(Console(stderr=True)))
    results["export_seconds"] = round(time.perf_counter() - start, 1)
    return results


def measure(name: str, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    per_type: dict[str, Any] = {}
    run: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "run_dir": str(run_dir), "overrides": overrides,
                           "machine": f"{platform.machine()} {os.cpu_count()} cpus", "command": " ".join(sys.argv)}
    for variant, setting in VARIANTS.items():
        add_variant(per_type, run, variant, export_variant(CONFIGS[name], run_dir, setting, overrides))
    return {"_run": run, **per_type}


def add_variant(per_type: dict[str, Any], run: dict[str, Any], variant: str, results: dict[str, Any]) -> None:
    """One export's numbers (a stage result or a manifest's `results`) as the `variant` column of each type."""
    base_kld = (results["divergence"].get("base") or {}).get("mean_kld")
    for gguf_type, r in results["files"].items():
        if "divergence" in r:
            per_type.setdefault(gguf_type, {})[variant] = _file_numbers(r, base_kld)
    run[variant] = {"export_seconds": results.get("export_seconds"), "imatrix": results["imatrix"],
                    "divergence": {k: v for k, v in results["divergence"].items() if k != "base"},
                    "base_kld": base_kld, "recommended": results["recommended"]["file"],
                    "warnings": results["warnings"]}


def _both(p: dict[str, Any], m: dict[str, Any], key: str, fmt: str) -> str:
    def one(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, bool):
            return "yes" if v else "NO"
        return format(v, fmt)
    return f"{one(p.get(key))} / {one(m.get(key))}"


def table(data: dict[str, Any]) -> str:
    """The markdown table BENCHMARKS.md shows: one row per config and type, plain and imatrix side by side."""
    lines = ["| config | type | size MB | mean KLD plain / imatrix | change | p99 KLD | same top | retention | "
             "ppl diff | stops | quantize s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for config, types in data.items():
        for gguf_type, v in types.items():
            if gguf_type.startswith("_"):
                continue
            p, m = v.get("plain", {}), v.get("imatrix", {})
            change = ("-" if not p.get("mean_kld") or m.get("mean_kld") is None
                      else f"{m['mean_kld'] / p['mean_kld'] - 1:+.1%}")
            size = (p or m)["size_bytes"] / 1e6
            lines.append(f"| {config} | {gguf_type} | {size:.1f} | {_both(p, m, 'mean_kld', '.4f')} | {change} | "
                         f"{_both(p, m, 'p99_kld', '.3f')} | {_both(p, m, 'same_top', '.1%')} | "
                         f"{_both(p, m, 'retention', '.1%')} | {_both(p, m, 'ppl_diff', '+.3f')} | "
                         f"{_both(p, m, 'stops', '')} | {_both(p, m, 'seconds', '.1f')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", help="CONFIG=RUN_DIR, CONFIG one of " + ", ".join(CONFIGS))
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override, every run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quant_quality.json")
    parser.add_argument("--table", action="store_true", help="print --out as BENCHMARKS.md's table and stop")
    parser.add_argument("--from-manifest", nargs=3, action="append", default=[],
                        metavar=("CONFIG", "VARIANT", "MANIFEST"),
                        help="take VARIANT (plain or imatrix) of CONFIG from an export's gguf/manifest.json "
                             "(`medtune export CONFIG --set export.imatrix=off|on`) instead of exporting again")
    args = parser.parse_args()
    data = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for name, variant, manifest in args.from_manifest:
        entry = data.setdefault(name, {"_run": {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
                                                "machine": f"{platform.machine()} {os.cpu_count()} cpus"}})
        add_variant(entry, entry["_run"], variant, json.loads(Path(manifest).read_text())["results"])
        entry["_run"][variant]["manifest"] = manifest
    if args.table:
        print(table(data))
        return
    for spec in args.runs:
        name, _, run_dir = spec.partition("=")
        if name not in CONFIGS or not run_dir:
            parser.error(f"{spec!r}: expected CONFIG=RUN_DIR with CONFIG one of {list(CONFIGS)}")
        data[name] = measure(name, Path(run_dir).resolve(), args.overrides)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    if args.from_manifest:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    print(table(data))


if __name__ == "__main__":
    main()
