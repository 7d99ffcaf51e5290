"""Reading training records from local files or hub datasets, and validating them against a schema.

Every record read ends up either as a `Conversation` or as a `Rejection` with its location and reason, so the
counts in the data report always add up.

Files are read by `medtune.formats.files`: JSON Lines (location `file:line`), a JSON array (`file[index]`), a JSON
object of records keyed by id (`file:line (key)`) or Parquet (`file[row]`), each plain or compressed with gzip,
bzip2, xz or zstd. A hub dataset's split is streamed row by row (`dataset:split[row]`).

Schemas (`schema="auto"` detects each record on its own, so one file may mix them; naming one parses every record
as that schema):

- `reasonmed`: `{"instruction", "input", "output"}` becomes one user turn and one assistant turn. The user turn is
  the instruction, followed by a blank line and the `input` text when `input` is not empty (the Alpaca convention
  the dataset follows; a missing or null `input` counts as empty); the assistant turn is `output`.
- `messages`: OpenAI style, `{"messages": [{"role", "content"}, ...]}`.
- `conversations`: `{"conversations": [{"role", "content"}, ...]}`.
- `sharegpt`: `{"conversations": [{"from", "value"}, ...]}`.
- `medical_o1`: medical-o1-reasoning-SFT, `{"Question", "Complex_CoT", "Response"}`. The user turn is `Question`;
  the assistant turn is "## Thinking\\n\\n{Complex_CoT}\\n\\n## Final Response\\n\\n{Response}", the template of
  HuatuoGPT-o1's own SFT script. The published records carry no such headings (their CoT is plain prose), so the
  headings are what tells the reasoning apart from the final answer, and a model tuned on them can be read by tools
  that split on them.

- `multiple_choice` (MedQA, AfriMed-QA: `question`, `options`, `answer_idx`), `medmcqa` (`opa`..`opd`, `cop`,
  `exp`) and `pubmedqa` (`QUESTION`, `CONTEXTS`, `final_decision`, `LONG_ANSWER`): read by the same readers as the
  evaluation benchmarks (`medtune.formats.choice`) and rendered as ReasonMed records: the question with its lettered
  options (and PubMedQA's abstract as the input), answered by the explanation when the record has one and always a
  final line "The answer is X.".
- `pairs`: preference pairs (`chosen`, `rejected`), read by data/pair_records.py when train.objective is dpo or
  orpo; read here (an SFT run), each is rejected with a reason that says so.

Auto-detection looks at the keys with a non-null value first (then at null ones), in this order: `chosen` or
`rejected` (pairs); `messages`; `conversations` (ShareGPT when its first turn has `from` or `value`); any of
`Question`, `Complex_CoT`, `Response` (medical_o1); `instruction` or `output` (reasonmed); then `question` with
`options` (multiple_choice) or `opa` (medmcqa), `QUESTION` with `CONTEXTS` or `final_decision` (pubmedqa). A record
with none of them is rejected as "unknown schema".

Turn-based records: roles are normalised to system/user/assistant (`human` -> user, `gpt` -> assistant, case
ignored); any other role is rejected. Turns are numbered from 1 in rejection details ("turn 3"); the reason itself
stays a short category so the report can count it. A system turn may only come first; the first other turn must be
the user's; a conversation must contain an assistant turn and end with one: trailing user turns would be trained on
as prompt with no reply, so such records are rejected rather than silently cut. Every content must be a non-empty
string. Texts are stripped of surrounding whitespace.

Every record: its total text (all contents) may not exceed `max_chars` characters ("record too long"), and an exact
duplicate of an earlier record (same roles and contents, whatever the schema) is rejected; duplicates are found by
a 16-byte BLAKE2b digest of the canonical messages.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medtune.errors import MedtuneError
from medtune.formats import choice
from medtune.formats.files import RawRecord, check_text_file, iter_raw_records
from medtune.hub import stream_dataset

SCHEMAS = ("reasonmed", "conversations", "messages", "sharegpt", "medical_o1", "pairs", *choice.FORMATS)
DEFAULT_MAX_CHARS = 200_000
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
MEDICAL_O1_REPLY = "## Thinking\n\n{cot}\n\n## Final Response\n\n{response}"

# Detection order and the keys that mark each schema; "conversations" is split into conversations/sharegpt later.
SCHEMA_MARKERS = (
    ("pairs", frozenset({"chosen", "rejected"})),
    ("messages", frozenset({"messages"})),
    ("conversations", frozenset({"conversations"})),
    ("medical_o1", frozenset({"Question", "Complex_CoT", "Response"})),
    ("reasonmed", frozenset({"instruction", "output"})),
)

@dataclass(frozen=True)
class Conversation:
    location: str  # file:line or file[index]
    messages: tuple[dict[str, str], ...]
    schema: str = ""
    # the messages as read, where data.balance_letters re-lettered them (the validation split is decided on these,
    # so a record's split does not depend on the setting)
    origin: tuple[dict[str, str], ...] | None = None


@dataclass(frozen=True)
class Rejection:
    location: str
    reason: str  # a short category, counted in the report
    detail: str = ""
    schema: str = ""  # the schema the record was read as, if any

    def __str__(self) -> str:
        return f"{self.location}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


class _BadRecord(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def _iter_raw(path: Path) -> Iterator[tuple[str, Any, str | None]]:
    """(location, parsed object or None, "reason|detail" or None) for every record of a file (see
    `medtune.formats.files.iter_raw_records`, which also gives each record's key)."""
    for location, value, error, _ in iter_raw_records(path):
        yield location, value, error


# ---- schemas: a record (dict) -> messages, or _BadRecord ----

Messages = tuple[dict[str, str], ...]


def _text(obj: dict[str, Any], key: str, where: str = "", allow_empty: bool = False) -> str:
    if key not in obj:
        raise _BadRecord(f"field '{key}' is missing", where)
    value = obj[key]
    if value is None:
        raise _BadRecord(f"field '{key}' is null", where)
    if not isinstance(value, str):
        raise _BadRecord(f"field '{key}' must be a string, got {type(value).__name__}", where)
    value = value.strip()
    if not value and not allow_empty:
        raise _BadRecord(f"field '{key}' is empty", where)
    return value


def _reasonmed(obj: dict[str, Any]) -> Messages:
    user = _text(obj, "instruction")
    context = "" if obj.get("input") is None else _text(obj, "input", allow_empty=True)
    reply = _text(obj, "output")
    if context:
        user = f"{user}\n\n{context}"
    return ({"role": "user", "content": user}, {"role": "assistant", "content": reply})


def _medical_o1(obj: dict[str, Any]) -> Messages:
    question = _text(obj, "Question")
    reply = MEDICAL_O1_REPLY.format(cot=_text(obj, "Complex_CoT"), response=_text(obj, "Response"))
    return ({"role": "user", "content": question}, {"role": "assistant", "content": reply})


def _turns(obj: dict[str, Any], field: str, role_key: str, content_key: str) -> Messages:
    if field not in obj:
        raise _BadRecord(f"field '{field}' is missing")
    turns = obj[field]
    if turns is None:
        raise _BadRecord(f"field '{field}' is null")
    if not isinstance(turns, list):
        raise _BadRecord(f"field '{field}' must be a list, got {type(turns).__name__}")
    if not turns:
        raise _BadRecord(f"field '{field}' is empty")
    messages = []
    for n, turn in enumerate(turns, start=1):
        where = f"turn {n}"
        if not isinstance(turn, dict):
            raise _BadRecord("turn is not a JSON object", f"{where}, got {type(turn).__name__}")
        name = _text(turn, role_key, where)
        role = ROLES.get(name.lower())
        if role is None:
            raise _BadRecord(f"unknown role {name[:40]!r}", where)
        if role == "system" and n > 1:
            raise _BadRecord("system turn after the first turn", where)
        messages.append({"role": role, "content": _text(turn, content_key, where)})
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise _BadRecord("no assistant turn")
    first = 1 if roles[0] == "system" else 0
    if roles[first] != "user":
        raise _BadRecord("conversation does not start with a user turn", f"turn {first + 1} is '{roles[first]}'")
    if roles[-1] != "assistant":
        raise _BadRecord("conversation does not end with an assistant turn", f"turn {len(roles)} is '{roles[-1]}'")
    return tuple(messages)


def _preference_pair(obj: dict[str, Any]) -> Messages:
    """Pairs are read by data/pair_records.py, in runs that train on them."""
    raise _BadRecord("a preference pair: set train.objective to dpo or orpo to train on pairs")


PARSERS: dict[str, Callable[[dict[str, Any]], Messages]] = {
    "reasonmed": _reasonmed,
    "conversations": lambda obj: _turns(obj, "conversations", "role", "content"),
    "messages": lambda obj: _turns(obj, "messages", "role", "content"),
    "sharegpt": lambda obj: _turns(obj, "conversations", "from", "value"),
    "medical_o1": _medical_o1,
    "pairs": _preference_pair,
}


def detect_schema(obj: dict[str, Any]) -> str | None:
    """The schema a record follows, judged by its keys (those with a non-null value first), or None.

    Multiple-choice records (`medtune.formats.choice`) are tried last, so a record that also carries a chat
    schema's keys (HuatuoGPT-o1's demo data has both) is read as the chat schema."""
    for keys in ({k for k, v in obj.items() if v is not None}, obj.keys()):
        for schema, markers in SCHEMA_MARKERS:
            if markers.isdisjoint(keys):
                continue
            if schema == "conversations":
                turns = obj["conversations"]
                first = turns[0] if isinstance(turns, list) and turns else None
                if isinstance(first, dict) and ("from" in first or "value" in first):
                    return "sharegpt"
            return schema
    return choice.detect_format(obj)


def _describe_keys(obj: dict[str, Any]) -> str:
    if not obj:
        return "no keys"
    keys = [k[:40] for k in list(obj)[:10]]
    return "keys: " + ", ".join(keys) + (", ..." if len(obj) > 10 else "")


def _digest(messages: Messages) -> bytes:
    canonical = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(canonical.encode("utf-8"), digest_size=16).digest()


def read_records(
    path: Path, schema: str = "auto", max_chars: int = DEFAULT_MAX_CHARS
) -> Iterator[Conversation | Rejection]:
    """Every record of `path` (any layout or compression `medtune.formats.files` reads) as a Conversation or a
    Rejection; exact duplicates are rejected after the first. A missing, empty or binary file is an error at once."""
    check_text_file(path)
    return records_from(iter_raw_records(path), schema, max_chars)


def read_hub_records(dataset: str, config: str | None, split: str, revision: str | None, schema: str = "auto",
                     max_chars: int = DEFAULT_MAX_CHARS) -> Iterator[Conversation | Rejection]:
    """The rows of one split of a hub dataset, streamed, as Conversations and Rejections (location `id:split[row]`).

    Access (gated, private, no network) and the split and config names are checked now, before any long step.
    """
    rows = stream_dataset(dataset, config, split, revision)
    label = f"{dataset}{'/' + config if config else ''}:{split}"
    raw = (RawRecord(f"{label}[{index}]", row, None, str(index)) for index, row in enumerate(rows))
    return records_from(raw, schema, max_chars)


def records_from(
    raw: Iterable[RawRecord], schema: str = "auto", max_chars: int = DEFAULT_MAX_CHARS
) -> Iterator[Conversation | Rejection]:
    """Conversations and Rejections from raw records, in their order.

    MedMCQA rows whose `cop` is 1-3 are held (with every record after them, to keep the order) until a row with cop
    0 or 4 tells the source's base; rows still held at the end are rejected, since their answers can't be read.
    """
    if schema not in ("auto", *SCHEMAS):
        names = ", ".join(repr(s) for s in ("auto", *SCHEMAS))
        raise MedtuneError(f"data.schema {schema!r}: supported schemas are {names}")
    if max_chars <= 0:
        raise MedtuneError(f"max_chars must be > 0, got {max_chars}")
    seen: set[bytes] = set()
    cop_base: int | None = None
    held: list[RawRecord] = []
    for record in raw:
        record_schema = _schema_of(record, schema)
        if record_schema == "medmcqa" and cop_base is None:
            cop = record.value.get("cop")
            cop_base = {0: 0, 4: 1}.get(cop) if isinstance(cop, int) and not isinstance(cop, bool) else None
            if cop_base is None:
                held.append(record)
                continue
        if held and cop_base is None:
            held.append(record)
            continue
        for waiting in [*held, record]:
            yield _outcome(waiting, _schema_of(waiting, schema), cop_base, max_chars, seen)
        held = []
    for waiting in held:
        yield _outcome(waiting, _schema_of(waiting, schema), None, max_chars, seen)


def _schema_of(record: RawRecord, schema: str) -> str | None:
    if record.error is not None or not isinstance(record.value, dict):
        return None
    return detect_schema(record.value) if schema == "auto" else schema


def _messages(obj: dict[str, Any], key: str, record_schema: str, cop_base: int | None) -> Messages:
    if record_schema not in choice.FORMATS:
        return PARSERS[record_schema](obj)
    try:
        if record_schema == "multiple_choice":
            item = choice.multiple_choice_item(obj, key)
        elif record_schema == "pubmedqa":
            item = choice.pubmedqa_item(obj, key)
        else:
            item, cop = choice.medmcqa_item(obj, key)
            if cop_base is None:
                raise _BadRecord("MedMCQA 'cop' base unknown", "every row of the source has cop 1-3, so 0-3 (hub) and "
                                 "1-4 (original release) can't be told apart; give the answers as letters instead")
            item = choice.with_cop(item, cop, cop_base)
    except choice.BadItem as bad:
        raise _BadRecord(bad.reason, bad.message if bad.message != bad.reason else "") from None
    return _reasonmed(choice.reasonmed_record(item))


def _outcome(record: RawRecord, record_schema: str | None, cop_base: int | None, max_chars: int,
             seen: set[bytes]) -> Conversation | Rejection:
    location, obj, error, key = record
    if error is not None:
        reason, _, detail = error.partition("|")
        return Rejection(location, reason, detail)
    if not isinstance(obj, dict):
        return Rejection(location, "record is not a JSON object", type(obj).__name__)
    if record_schema is None:
        return Rejection(location, "unknown schema", _describe_keys(obj))
    try:
        messages = _messages(obj, key, record_schema, cop_base)
    except _BadRecord as bad:
        return Rejection(location, bad.reason, bad.detail, record_schema)
    chars = sum(len(m["content"]) for m in messages)
    if chars > max_chars:
        return Rejection(location, "record too long", f"{chars:,} characters, the cap is {max_chars:,}", record_schema)
    digest = _digest(messages)
    if digest in seen:
        return Rejection(location, "exact duplicate of an earlier record", "", record_schema)
    seen.add(digest)
    return Conversation(location, messages, record_schema)
