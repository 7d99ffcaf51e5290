"""Running a model over benchmark items and summarizing: one `Solver` per way of answering, per-item records.

Solvers: `EngineSolver` (chain-of-thought generation one item at a time through an inference engine: the eval stage
uses it for GGUF files), `BatchedSolver` (the same generation for HF models, batched on a GPU), `LoglikSolver`
(log-likelihood of the option letters, HF models only) and `ClozeSolver` (log-likelihood of the option texts).
Per-item results are appended to a JSONL file as they are produced; an interrupted evaluation resumes from it.
Every record says what was asked: its formulation, the item's id and the circular shift of its options (a shifted
copy of an item has its own id, `medtune.evaluate.formulations.shifted`), the options as shown, and the gold letter.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from medtune.answers import extract_letter
from medtune.engines import Engine
from medtune.evaluate.formulations import shift_of
from medtune.evaluate.hf import BatchedGenerator
from medtune.evaluate.loglik import LoglikScorer, choose, cloze_request, loglik_request, normalized
from medtune.evaluate.stats import wilson_interval
from medtune.formats.choice import Item, question_prompt


class Solver(Protocol):
    mode: str  # "generate", "loglik" or "cloze"
    batch_size: int  # items handed to `solve` at once

    def solve(self, items: list[Item]) -> list[dict[str, Any]]:
        """One record per item, in order: at least id, prompt, output, extracted (letter or None), gold, correct."""
        ...


def asked(item: Item, formulation: str) -> dict[str, Any]:
    """The fields every record starts with: what was asked and its key."""
    item_id, shift = shift_of(item.id)
    return {"id": item.id, "item_id": item_id, "shift": shift, "formulation": formulation, "options": item.options,
            "gold": item.answer}


def _generated(item: Item, prompt: str, result: dict[str, Any]) -> dict[str, Any]:
    letter = extract_letter(result["text"], item.options)
    return {**asked(item, "generate"), "prompt": prompt, "output": result["text"], "extracted": letter,
            "correct": letter == item.answer, "finish_reason": result["finish_reason"],
            "completion_tokens": result["completion_tokens"]}


class EngineSolver:
    """Greedy chain-of-thought answers one item at a time through an inference engine (llama.cpp or transformers)."""

    mode, batch_size = "generate", 1

    def __init__(self, engine: Engine, max_new_tokens: int) -> None:
        self.engine, self.max_new_tokens = engine, max_new_tokens

    def solve(self, items: list[Item]) -> list[dict[str, Any]]:
        records = []
        for item in items:
            prompt = question_prompt(item)
            result = self.engine.complete([{"role": "user", "content": prompt}], temperature=0.0, top_p=1.0,
                                          max_tokens=self.max_new_tokens)
            records.append(_generated(item, prompt, result))
        return records


class BatchedSolver:
    """Greedy chain-of-thought answers generated for `generator.batch_size` items at once (HF models on a GPU)."""

    mode = "generate"

    def __init__(self, generator: BatchedGenerator, max_new_tokens: int) -> None:
        self.generator, self.max_new_tokens = generator, max_new_tokens
        self.batch_size = generator.batch_size

    def solve(self, items: list[Item]) -> list[dict[str, Any]]:
        prompts = [question_prompt(item) for item in items]
        results = self.generator.generate([[{"role": "user", "content": p}] for p in prompts], self.max_new_tokens)
        return [_generated(item, prompt, result) for item, prompt, result in zip(items, prompts, results)]


class LoglikSolver:
    """The option whose continuation the model finds most likely after the benchmark's lm-eval prompt."""

    mode = "loglik"

    def __init__(self, scorer: LoglikScorer, kind: str) -> None:
        self.scorer, self.kind, self.batch_size = scorer, kind, scorer.batch_size

    def solve(self, items: list[Item]) -> list[dict[str, Any]]:
        requests = [loglik_request(item, self.kind) for item in items]
        records = []
        for item, request, scores in zip(items, requests, self.scorer.score(requests)):
            letter = choose(scores)
            records.append({**asked(item, "loglik"), "prompt": request.context,
                            "output": request.continuations[letter], "extracted": letter,
                            "correct": letter == item.answer, "logprobs": {k: round(v, 6) for k, v in scores.items()}})
        return records


class ClozeSolver:
    """The option whose text the model finds most likely after "Question: ...\nAnswer:" (no letters shown): by the
    summed log-likelihood (`extracted`, lm-eval's `acc`) and per character of the text (`extracted_norm`,
    `acc_norm`)."""

    mode = "cloze"

    def __init__(self, scorer: LoglikScorer, kind: str) -> None:
        self.scorer, self.kind, self.batch_size = scorer, kind, scorer.batch_size

    def solve(self, items: list[Item]) -> list[dict[str, Any]]:
        requests = [cloze_request(item, self.kind) for item in items]
        records = []
        for item, request, scores in zip(items, requests, self.scorer.score(requests)):
            letter, norm = choose(scores), choose(normalized(scores, item.options))
            records.append({**asked(item, "cloze"), "prompt": request.context,
                            "output": request.continuations[letter], "extracted": letter,
                            "correct": letter == item.answer, "extracted_norm": norm,
                            "correct_norm": norm == item.answer,
                            "logprobs": {k: round(v, 6) for k, v in scores.items()}})
        return records


def read_records(path: Path) -> dict[str, dict[str, Any]]:
    """{item id: record} from a per-item JSONL file ({} if there is none yet)."""
    done: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                done[record["id"]] = record
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut by a kill: that item is simply run again
    return done


def _size(item: Item) -> int:
    return len(item.question) + len(item.context) + sum(len(option) for option in item.options.values())


def summarize(records: list[dict[str, Any]], mode: str, ran: int, elapsed: float) -> dict[str, Any]:
    """Accuracy with its 95% Wilson interval, extraction failures, and items/s over the `ran` items run now."""
    n = len(records)
    correct = sum(bool(r["correct"]) for r in records)
    failures = sum(r["extracted"] is None for r in records)
    low, high = wilson_interval(correct, n)
    return {
        "mode": mode,
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else 0.0,
        "ci95": [round(low, 4), round(high, 4)],
        "extraction_failures": failures,
        "extraction_failure_rate": failures / n if n else 0.0,
        "items_per_s": round(ran / elapsed, 3) if ran and elapsed > 0 else None,
    }


def evaluate_items(solver: Solver, items: list[Item], out_jsonl: Path,
                   on_item: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Answer every item not already in `out_jsonl` (appending each record as it comes), then summarize all."""
    done = read_records(out_jsonl)
    pending = [item for item in items if item.id not in done]
    for _ in range(len(items) - len(pending)):
        if on_item:
            on_item()
    if solver.batch_size > 1:
        pending.sort(key=_size)  # items of similar length share a batch: less padding
    start = time.perf_counter()
    with open(out_jsonl, "a", encoding="utf-8") as fh:
        for first in range(0, len(pending), solver.batch_size):
            for record in solver.solve(pending[first:first + solver.batch_size]):
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
                done[record["id"]] = record
                if on_item:
                    on_item()
            fh.flush()
    elapsed = time.perf_counter() - start
    return summarize([done[item.id] for item in items], solver.mode, len(pending), elapsed)
