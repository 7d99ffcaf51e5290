"""What keeping report.html and the model card up to date costs a run: the time of each piece the pipeline adds.

After every stage the pipeline records the machine (`environment()`) in the manifest and rewrites report.html; after
evaluation it rewrites the model card. This times each on a finished run folder, in a fresh process (imports
included, as in a run), repeats them, and writes the numbers as JSON:

    PYTHONPATH=src python bench/report_time.py runs/demo configs/demo.yaml --out bench/results/report_time.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("config", type=Path)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    # what a run has loaded anyway by the time the pipeline writes the report (not counted)
    from medtune.artifacts import RunDir
    from medtune.config import load_config
    from medtune.pipeline import STAGES, active_stages, environment

    start = time.perf_counter()
    from medtune.report import write_report  # the report's own modules (and yaml, numpy where not loaded yet)
    imports = time.perf_counter() - start
    from medtune.export.card import refresh_card  # the export stage's module: loaded by a run anyway

    with tempfile.TemporaryDirectory() as tmp:  # a copy: the card and manifest rewrites leave the run as it was
        run = Path(tmp) / "run"
        # the files the report and the card read; weights, token arrays and caches stay behind
        shutil.copytree(args.run_dir, run, ignore=shutil.ignore_patterns(
            "*.gguf", "*.safetensors", "*.ids.npy", "*.mask.npy", "eval_cache", "checkpoints", "tensorboard"))
        cfg = load_config(args.config, [f"run_dir={run}"])
        timings: dict[str, list[float]] = {"environment": [], "report": [], "card": []}
        for _ in range(args.repeat):
            for key, call in (("environment", environment), ("report", lambda: write_report(run, STAGES)),
                              ("card", lambda: refresh_card(cfg, RunDir(run)))):
                t = time.perf_counter()
                call()
                timings[key].append(time.perf_counter() - t)
        stages = len(active_stages(cfg))
        size = (run / "report.html").stat().st_size
    median = {k: statistics.median(v) for k, v in timings.items()}
    # the first call of each is cold (lazy imports): counted once, the later stages at the median
    per_run = (imports + timings["report"][0] + (stages - 1) * median["report"] + timings["environment"][0]
               + (stages - 1) * median["environment"] + timings["card"][0])
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    result = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {cpu}, "
              f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}",
              "run": str(args.run_dir), "stages": stages, "report_bytes": size, "imports_s": round(imports, 3),
              "seconds": {k: [round(x, 4) for x in v] for k, v in timings.items()},
              "median_s": {k: round(v, 4) for k, v in median.items()},
              "added_to_a_run_s": round(per_run, 3)}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
