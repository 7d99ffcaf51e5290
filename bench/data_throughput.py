"""Data stage throughput: template + tokenize + mask + pack a synthetic ReasonMed-like file on this machine's CPUs.

Writes a 100k-record JSONL (lengths lognormal, median ~700 tokens, sigma 0.6, clipped 160..4096; prompts 120-400
tokens), runs medtune's data stage on it with the SmolLM2 tokenizer (max_len 4096, packing on), and reports real
tokens/s of the stage, peak RSS and packing efficiency as JSON (default bench/results/data_throughput.json).

    python bench/data_throughput.py [--records 100000] [--out bench/results/data_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from common import synthetic_file


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "data_throughput.json")
    args = parser.parse_args()

    from medtune.artifacts import RunDir
    from medtune.config import load_config
    from medtune.pipeline import BY_NAME, run_stage
    from medtune.ui import UI

    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "synthetic.jsonl"
        synthetic_file(data, args.records)
        cfg = load_config(root / "configs" / "demo.yaml", [
            f"data.path={data}", f"run_dir={tmp}/run", "data.max_len=4096", "data.packing=true",
            "data.val_fraction=0.01", "data.contamination=ignore",
        ])
        run = RunDir(cfg.run_dir)
        from medtune.models import load_tokenizer, resolve_base

        load_tokenizer(resolve_base(cfg.base.model))  # warm the model cache outside the timing
        start = time.perf_counter()
        report = run_stage(BY_NAME["data"], cfg, run, UI())
        elapsed = time.perf_counter() - start
    tokens = report["splits"]["train"]["tokens"] + report["splits"]["val"]["tokens"]
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "records": args.records,
        "tokens": tokens,
        "seconds": round(elapsed, 2),
        "tokens_per_s": round(tokens / elapsed),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "packing_efficiency": report["splits"]["train"]["packing_efficiency"],
        "lengths": report["lengths"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
