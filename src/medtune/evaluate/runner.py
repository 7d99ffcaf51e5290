"""Running a model over benchmark items: greedy chain-of-thought generation, extraction, per-item records.

Per-item results are appended to a JSONL file as they are produced; an interrupted evaluation resumes from it.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from medtune.evaluate.benchmarks import Item
from medtune.evaluate.extract import extract_letter
from medtune.evaluate.prompts import multiple_choice_prompt
from medtune.infer.engines import Engine


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion."""
    if total == 0:
        return (0.0, 0.0)
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def evaluate_items(engine: Engine, items: list[Item], out_jsonl: Path, max_new_tokens: int,
                   on_item=None) -> dict[str, Any]:
    done: dict[str, dict[str, Any]] = {}
    if out_jsonl.is_file():
        for line in out_jsonl.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                done[record["id"]] = record
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut by a kill: that item is simply run again
    start = time.perf_counter()
    ran = 0
    with open(out_jsonl, "a", encoding="utf-8") as fh:
        for item in items:
            if item.id not in done:
                prompt = multiple_choice_prompt(item)
                result = engine.complete([{"role": "user", "content": prompt}], temperature=0.0, top_p=1.0,
                                         max_tokens=max_new_tokens)
                letter = extract_letter(result["text"], item.options)
                record = {"id": item.id, "prompt": prompt, "output": result["text"], "extracted": letter,
                          "gold": item.answer, "correct": letter == item.answer,
                          "finish_reason": result["finish_reason"], "completion_tokens": result["completion_tokens"]}
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
                fh.flush()
                done[item.id] = record
                ran += 1
            if on_item:
                on_item()
    elapsed = time.perf_counter() - start
    records = [done[item.id] for item in items]
    correct = sum(r["correct"] for r in records)
    low, high = wilson_interval(correct, len(records))
    return {
        "n": len(records),
        "correct": correct,
        "accuracy": correct / len(records),
        "ci95": [round(low, 4), round(high, 4)],
        "extraction_failures": sum(r["extracted"] is None for r in records),
        "extraction_failure_rate": sum(r["extracted"] is None for r in records) / len(records),
        "items_per_s": round(ran / elapsed, 3) if ran and elapsed > 0 else None,
    }
