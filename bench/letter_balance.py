"""Letter balancing on real training files: how many records are re-lettered, kept as they are (and why), and the
gold-letter shares before and after, through the data stage's own reader and `medtune.formats.relabel`.

  python bench/letter_balance.py [--seed 42] [--examples 6] [--out bench/results/letter_balance.json]

Reads the files of ../shared/data named in FILES, the repo's demo sample and the quality study's training file
(built by `bench/quality_study.py`'s data phase into a temporary folder); writes the JSON with, per file, the data
report's `letters` section and a few re-lettered records (before/after) to read by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from medtune.data.sources import Conversation, read_records  # noqa: E402
from medtune.data.stage import balanced  # noqa: E402
from medtune.formats.relabel import Balancer, LetterStats  # noqa: E402

SHARED = Path(os.environ.get("MEDTUNE_SHARED_DATA", ROOT.parent / "shared" / "data"))
FILES = {
    "medical_cot_train": SHARED / "cot" / "medical_cot_train.jsonl",
    "huatuogpt_o1_demo": SHARED / "huatuogpt_o1" / "demo_data.json",
    "afrimedqa_train": SHARED / "medagents_benchmark" / "afrimedqa" / "train.jsonl",
    "medmcqa_dev": SHARED / "medmcqa_dev" / "dev.json",
    "reasonmed_sample": ROOT / "examples" / "reasonmed_sample.jsonl",
}


def measure(path: Path, seed: int, examples: int) -> dict:
    stats = LetterStats()
    started = time.perf_counter()
    raw = list(read_records(path))
    out = list(balanced(iter(raw), Balancer(seed), stats))
    seconds = time.perf_counter() - started
    changed = [c for c in out if isinstance(c, Conversation) and c.origin is not None]
    step = max(1, len(changed) // max(1, examples))
    shown = [{"location": c.location, "before": list(c.origin[-2:]), "after": list(c.messages[-2:])}
             for c in changed[::step][:examples]]
    return {"path": str(path), "records": len(raw), "conversations": sum(isinstance(c, Conversation) for c in raw),
            "seconds": round(seconds, 3), "letters": stats.report(True), "relettered_examples": shown}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--examples", type=int, default=6)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "letter_balance.json")
    args = parser.parse_args()
    results = {name: measure(path, args.seed, args.examples) for name, path in FILES.items()}
    sys.path.insert(0, str(ROOT / "bench"))
    from quality_study import build_data

    with tempfile.TemporaryDirectory() as tmp:
        build_data(SHARED, Path(tmp))
        results["quality_study_train"] = measure(Path(tmp) / "train.jsonl", args.seed, args.examples)
        results["quality_study_train"]["path"] = "runs/study/data/train.jsonl (bench/quality_study.py data)"
    for name, r in results.items():
        letters = r["letters"]
        print(f"{name}: {r['conversations']} conversations, {letters['multiple_choice']} multiple choice: "
              f"{letters['relettered']} re-lettered, {letters['in_place']} in place, {letters['kept_as_is']} kept "
              f"{letters['kept_by_reason']}; not MC {letters['not_multiple_choice_by_reason']}")
        print(f"   before {letters['gold_shares_before']}\n   after  {letters['gold_shares_after']}")
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "seed": args.seed, "files": results},
                                   indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
