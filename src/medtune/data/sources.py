"""Reading training records from local files or hub datasets, and validating them against a schema.

Every record read ends up either as a `Conversation` or as a `Rejection` with its location and reason, so the
counts in the data report always add up.

ReasonMed (`{"instruction", "input", "output"}`) becomes one user turn and one assistant turn. The user turn is the
instruction, followed by a blank line and the `input` text when `input` is not empty (the Alpaca convention the
dataset follows); the assistant turn is `output`, unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medtune.errors import MedtuneError

REASONMED_FIELDS = ("instruction", "input", "output")


@dataclass(frozen=True)
class Conversation:
    location: str  # file:line or file[index]
    messages: tuple[dict[str, str], ...]


@dataclass(frozen=True)
class Rejection:
    location: str
    reason: str  # a short category, counted in the report
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.location}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


def hub_data_file(dataset: str, filename: str, revision: str | None) -> Path:
    """Download (or reuse from the HF cache) one file of a hub dataset, e.g. ReasonMed.json."""
    from huggingface_hub import hf_hub_download

    from medtune.models import check_hub_access

    check_hub_access(dataset, revision, repo_type="dataset")
    return Path(hf_hub_download(dataset, filename, repo_type="dataset", revision=revision))


def _iter_raw(path: Path) -> Iterator[tuple[str, Any, str | None]]:
    """Yield (location, parsed object or None, error or None) for every record in a JSON array or JSONL file."""
    if not path.is_file():
        raise MedtuneError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise MedtuneError(f"{path}: the file is empty")
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf").lstrip()
    if head.startswith(b"["):
        try:
            records = json.loads(path.read_bytes().decode("utf-8-sig"))
        except UnicodeDecodeError as exc:
            raise MedtuneError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
        except json.JSONDecodeError as exc:
            raise MedtuneError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); is the array truncated?") from None
        for i, obj in enumerate(records):
            yield f"{path.name}[{i}]", obj, None
        return
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            location = f"{path.name}:{lineno}"
            if lineno == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                yield location, None, f"not UTF-8|{exc.reason} at byte {exc.start}"
                continue
            if not line:
                continue  # blank lines are not records
            try:
                yield location, json.loads(line), None
            except json.JSONDecodeError as exc:
                yield location, None, f"malformed JSON|{exc.msg} at column {exc.colno}"


def _reasonmed(obj: dict[str, Any]) -> tuple[dict[str, str], ...] | str:
    for field in REASONMED_FIELDS:
        if field == "input" and field not in obj:
            continue  # some exports drop an empty input
        value = obj.get(field)
        if field not in obj:
            return f"field '{field}' is missing"
        if value is None:
            return f"field '{field}' is null"
        if not isinstance(value, str):
            return f"field '{field}' must be a string, got {type(value).__name__}"
        if field != "input" and not value.strip():
            return f"field '{field}' is empty"
    user = obj["instruction"].strip()
    context = (obj.get("input") or "").strip()
    if context:
        user = f"{user}\n\n{context}"
    return ({"role": "user", "content": user}, {"role": "assistant", "content": obj["output"].strip()})


def read_records(path: Path, schema: str = "auto") -> Iterator[Conversation | Rejection]:
    """Every record of `path` as a Conversation or a Rejection; exact duplicates are rejected after the first."""
    if schema not in ("auto", "reasonmed"):
        raise MedtuneError(f"data.schema {schema!r}: supported schemas are 'auto' and 'reasonmed'")
    seen: set[int] = set()
    for location, obj, error in _iter_raw(path):
        if error is not None:
            reason, _, detail = error.partition("|")
            yield Rejection(location, reason, detail)
            continue
        if not isinstance(obj, dict):
            yield Rejection(location, "record is not a JSON object", type(obj).__name__)
            continue
        result = _reasonmed(obj)
        if isinstance(result, str):
            yield Rejection(location, result)
            continue
        key = hash(json.dumps(result, sort_keys=True))
        if key in seen:
            yield Rejection(location, "exact duplicate of an earlier record")
            continue
        seen.add(key)
        yield Conversation(location, result)
