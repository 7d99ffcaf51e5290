"""Checking a training data file without preparing it: how many records are usable, and why the others are not.

`check_file` reads every record with the same reader the data stage uses, so its verdict is the stage's verdict
(before tokenization: the data stage may still drop records longer than data.max_len tokens). A file whose first
record is a preference pair (or `schema="pairs"`) is checked as a DPO/ORPO run reads it, in pairs; else as an SFT
run reads it, in conversations.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from medtune.data.pair_records import Pair, file_record_kind, read_pairs
from medtune.data.sources import DEFAULT_MAX_CHARS, Conversation, read_records
from medtune.errors import MedtuneError

EXAMPLES_PER_REASON = 3


def check_file(path: Path, schema: str = "auto", max_chars: int = DEFAULT_MAX_CHARS) -> dict[str, Any]:
    """Read every record of `path`; return counts by outcome, reason and schema, with a few example locations.

    `schemas` counts every record whose schema is known (usable or rejected); records that are not JSON objects,
    not parseable or of no known schema are in no schema's count. Raises MedtuneError (exit code 2) when the file
    cannot be read at all, or holds no record. `record_kind` is "pairs" or "conversations".
    """
    kind = "pairs" if schema == "pairs" or (schema == "auto" and file_record_kind(path) == "pairs") else \
        "conversations"
    items = read_pairs(path, max_chars) if kind == "pairs" else read_records(path, schema, max_chars)
    records = usable = 0
    by_reason: Counter[str] = Counter()
    schemas: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    for item in items:
        records += 1
        if item.schema:
            schemas[item.schema] += 1
        if isinstance(item, (Conversation, Pair)):
            usable += 1
            continue
        by_reason[item.reason] += 1
        shown = examples.setdefault(item.reason, [])
        if len(shown) < EXAMPLES_PER_REASON:
            shown.append(f"{item.location} ({item.detail})" if item.detail else item.location)
    if records == 0:
        raise MedtuneError(f"{path}: no records in the file")
    return {
        "path": str(path),
        "record_kind": kind,
        "records": records,
        "usable": usable,
        "rejected": records - usable,
        "rejected_by_reason": dict(by_reason.most_common()),
        "schemas": dict(schemas.most_common()),
        "examples": {reason: examples[reason] for reason, _ in by_reason.most_common()},
    }


def format_report(report: dict[str, Any]) -> str:
    """The report of `check_file` as a few lines for a person."""
    lines = [
        f"{report['path']}: {report['records']:,} records, {report['usable']:,} usable"
        f"{' preference pairs' if report['record_kind'] == 'pairs' else ''}, {report['rejected']:,} rejected",
    ]
    if report["schemas"]:
        lines.append("schemas: " + ", ".join(f"{name} {count:,}" for name, count in report["schemas"].items()))
    if report["rejected_by_reason"]:
        lines.append("rejected:")
        width = len(f"{max(report['rejected_by_reason'].values()):,}")
        for reason, count in report["rejected_by_reason"].items():
            lines.append(f"  {count:>{width},}  {reason}")
            lines.append(f"  {'':>{width}}  e.g. " + "; ".join(report["examples"].get(reason, [])))
    return "\n".join(lines)
