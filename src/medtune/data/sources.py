"""Reading training records from local files or hub datasets, and validating them against a schema.

Every record read ends up either as a `Conversation` or as a `Rejection` with its location and reason, so the
counts in the data report always add up.

Files: JSON Lines (location `file:line`; blank lines are not records), a JSON array (streamed element by element so
memory stays bounded; location `file[index]`), or Parquet (`.parquet`, read in record batches with pyarrow; location
`file[row]`). A UTF-8 byte-order mark and CRLF line ends are accepted.

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

Auto-detection looks at the keys with a non-null value first (then at null ones), in this order: `messages`;
`conversations` (ShareGPT when its first turn has `from` or `value`); any of `Question`, `Complex_CoT`, `Response`
(medical_o1); `instruction` or `output` (reasonmed). A record with none of them is rejected as "unknown schema".

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

import codecs
import hashlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from medtune.errors import MedtuneError

SCHEMAS = ("reasonmed", "conversations", "messages", "sharegpt", "medical_o1")
DEFAULT_MAX_CHARS = 200_000
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
MEDICAL_O1_REPLY = "## Thinking\n\n{cot}\n\n## Final Response\n\n{response}"

# Detection order and the keys that mark each schema; "conversations" is split into conversations/sharegpt later.
SCHEMA_MARKERS = (
    ("messages", frozenset({"messages"})),
    ("conversations", frozenset({"conversations"})),
    ("medical_o1", frozenset({"Question", "Complex_CoT", "Response"})),
    ("reasonmed", frozenset({"instruction", "output"})),
)

BOM = b"\xef\xbb\xbf"
JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")
CHUNK_BYTES = 1 << 20
# A JSON array element that does not parse within this many characters is malformed (or absurd): stop there
# instead of reading the rest of the file into memory looking for its end.
MAX_ELEMENT_CHARS = 64 << 20
PARQUET_BATCH_ROWS = 1024


@dataclass(frozen=True)
class Conversation:
    location: str  # file:line or file[index]
    messages: tuple[dict[str, str], ...]
    schema: str = ""


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


def hub_data_file(dataset: str, filename: str, revision: str | None) -> Path:
    """Download (or reuse from the HF cache) one file of a hub dataset, e.g. ReasonMed.json."""
    from huggingface_hub import hf_hub_download

    from medtune.models import check_hub_access

    check_hub_access(dataset, revision, repo_type="dataset")
    return Path(hf_hub_download(dataset, filename, repo_type="dataset", revision=revision))


# ---- raw records: (location, parsed object or None, "reason|detail" or None) ----

RawRecord = tuple[str, Any, str | None]


def _iter_raw(path: Path) -> Iterator[RawRecord]:
    """Every record in a JSON array, JSONL or Parquet file; problems with the whole file raise MedtuneError."""
    if not path.is_file():
        raise MedtuneError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise MedtuneError(f"{path}: the file is empty")
    with open(path, "rb") as fh:
        head = fh.read(4096)
    if path.suffix.lower() == ".parquet" or head.startswith(b"PAR1"):
        yield from _iter_parquet(path)
    elif head.removeprefix(BOM).lstrip().startswith(b"["):
        yield from _iter_json_array(path)
    else:
        yield from _iter_jsonl(path)


def _iter_jsonl(path: Path) -> Iterator[RawRecord]:
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            location = f"{path.name}:{lineno}"
            if lineno == 1:
                raw = raw.removeprefix(BOM)
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


class _TextWindow:
    """The not yet parsed text of a UTF-8 file: a window that grows at its end and drops what was consumed."""

    def __init__(self, fh: BinaryIO, path: Path, chunk_bytes: int) -> None:
        self.fh = fh
        self.path = path
        self.chunk_bytes = chunk_bytes
        self.text = ""
        self.pos = 0  # the next character to parse
        self.line = 1  # line number of text[0]
        self.eof = False
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._bytes_fed = 0

    def read_more(self, n_bytes: int) -> None:
        data = self.fh.read(n_bytes)
        if self._bytes_fed == 0 and data.startswith(BOM):
            data = data[len(BOM):]
            self._bytes_fed = len(BOM)
        pending = len(self._decoder.getstate()[0])
        try:
            new = self._decoder.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            at = self._bytes_fed - pending + exc.start
            raise MedtuneError(f"{self.path}: not UTF-8 ({exc.reason} at byte {at})") from None
        self._bytes_fed += len(data)
        self.eof = not data
        self.line += self.text.count("\n", 0, self.pos)
        self.text = self.text[self.pos:] + new
        self.pos = 0

    def current_line(self) -> int:
        return self.line + self.text.count("\n", 0, self.pos)

    def next_char(self) -> str:
        """Skip whitespace; the next character (not consumed), or "" at the end of the file."""
        while True:
            self.pos = JSON_WHITESPACE.match(self.text, self.pos).end()
            if self.pos < len(self.text):
                return self.text[self.pos]
            if self.eof:
                return ""
            self.read_more(self.chunk_bytes)

    def value(self, decoder: json.JSONDecoder, index: int) -> Any:
        """Parse the JSON value at the current position, reading more of the file until it is complete."""
        while True:
            try:
                obj, end = decoder.raw_decode(self.text, self.pos)
                # A value ending right at the window's end may be cut (a number, say): only trust it with more after.
                if end < len(self.text) or self.eof:
                    self.pos = end
                    return obj
            except json.JSONDecodeError as exc:
                if self.eof:
                    raise MedtuneError(
                        f"{self.path}:{self.line + exc.lineno - 1}: not valid JSON in element {index} ({exc.msg}); "
                        "is the array truncated?"
                    ) from None
                if len(self.text) - self.pos > MAX_ELEMENT_CHARS:
                    raise MedtuneError(
                        f"{self.path}:{self.current_line()}: element {index} does not parse within "
                        f"{MAX_ELEMENT_CHARS:,} characters ({exc.msg}): not valid JSON, or far too long for a record"
                    ) from None
            # Grow geometrically so a large element is re-parsed only a few times.
            self.read_more(max(self.chunk_bytes, len(self.text) - self.pos))


def _iter_json_array(path: Path, chunk_bytes: int = CHUNK_BYTES) -> Iterator[RawRecord]:
    """The elements of a top-level JSON array, holding about one chunk plus one element in memory."""
    decoder = json.JSONDecoder()
    with open(path, "rb") as fh:
        window = _TextWindow(fh, path, chunk_bytes)
        if window.next_char() != "[":
            raise MedtuneError(f"{path}: not a JSON array")
        window.pos += 1
        index = 0
        char = window.next_char()
        while char != "]":
            if char == "":
                raise MedtuneError(f"{path}: the JSON array ends without ']' after {index} elements; is it truncated?")
            yield f"{path.name}[{index}]", window.value(decoder, index), None
            index += 1
            char = window.next_char()
            if char == ",":
                window.pos += 1
                char = window.next_char()
                if char in ("]", ""):
                    raise MedtuneError(f"{path}:{window.current_line()}: not valid JSON (a value must follow ',' "
                                       f"after element {index - 1}); is the array truncated?")
            elif char not in ("]", ""):
                raise MedtuneError(f"{path}:{window.current_line()}: not valid JSON (expected ',' or ']' after "
                                   f"element {index - 1}, got {char!r})")
        window.pos += 1
        if window.next_char() != "":
            raise MedtuneError(f"{path}:{window.current_line()}: not valid JSON (extra data after the array's ']')")


def _iter_parquet(path: Path) -> Iterator[RawRecord]:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise MedtuneError(f"{path}: reading Parquet files needs pyarrow: pip install pyarrow") from None
    try:
        index = 0
        for batch in pyarrow.parquet.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for row in batch.to_pylist():
                yield f"{path.name}[{index}]", row, None
                index += 1
    except (pyarrow.ArrowException, OSError) as exc:
        raise MedtuneError(f"{path}: not a readable Parquet file ({exc})") from None


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


PARSERS: dict[str, Callable[[dict[str, Any]], Messages]] = {
    "reasonmed": _reasonmed,
    "conversations": lambda obj: _turns(obj, "conversations", "role", "content"),
    "messages": lambda obj: _turns(obj, "messages", "role", "content"),
    "sharegpt": lambda obj: _turns(obj, "conversations", "from", "value"),
    "medical_o1": _medical_o1,
}


def detect_schema(obj: dict[str, Any]) -> str | None:
    """The schema a record follows, judged by its keys (those with a non-null value first), or None."""
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
    return None


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
    """Every record of `path` as a Conversation or a Rejection; exact duplicates are rejected after the first."""
    if schema not in ("auto", *SCHEMAS):
        names = ", ".join(repr(s) for s in ("auto", *SCHEMAS))
        raise MedtuneError(f"data.schema {schema!r}: supported schemas are {names}")
    if max_chars <= 0:
        raise MedtuneError(f"max_chars must be > 0, got {max_chars}")
    seen: set[bytes] = set()
    for location, obj, error in _iter_raw(path):
        if error is not None:
            reason, _, detail = error.partition("|")
            yield Rejection(location, reason, detail)
            continue
        if not isinstance(obj, dict):
            yield Rejection(location, "record is not a JSON object", type(obj).__name__)
            continue
        record_schema = detect_schema(obj) if schema == "auto" else schema
        if record_schema is None:
            yield Rejection(location, "unknown schema", _describe_keys(obj))
            continue
        try:
            messages = PARSERS[record_schema](obj)
        except _BadRecord as bad:
            yield Rejection(location, bad.reason, bad.detail, record_schema)
            continue
        chars = sum(len(m["content"]) for m in messages)
        if chars > max_chars:
            yield Rejection(location, "record too long", f"{chars:,} characters, the cap is {max_chars:,}",
                            record_schema)
            continue
        digest = _digest(messages)
        if digest in seen:
            yield Rejection(location, "exact duplicate of an earlier record", "", record_schema)
            continue
        seen.add(digest)
        yield Conversation(location, messages, record_schema)
