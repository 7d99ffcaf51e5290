"""Opening data files, compressed or not, and reading their raw records with the location of each.

Compression is told by a file's first bytes, not by its name: gzip (`.gz`), bzip2 (`.bz2`), xz (`.xz`) and zstd
(`.zst`) are decompressed while they are read, never unpacked to disk, and their records keep the locations the
plain file would give. A file that is binary after that (an archive, a model, a picture) is one MedtuneError
("not a text data file"), not a list of undecodable records.

Layouts, told by the content:
- JSON Lines: one record a line; location `file:line` (blank lines are not records).
- a JSON array of records, streamed element by element so memory stays bounded; location `file[index]`.
- a JSON object of records keyed by id (PubMedQA's `ori_pqal.json`), streamed the same way; location
  `file:line (key)`, the line of the key, and the key is kept as the record's id. Any other JSON document holding
  one object is one MedtuneError. A file whose lines each parse alone is JSON Lines, whatever its first line holds;
  a one-line file holding an object whose values are all objects is a keyed document.
- Parquet (`PAR1`), read in record batches with pyarrow; location `file[row]`. A compressed Parquet file is refused
  (Parquet compresses its own columns, and pyarrow needs to seek).
A UTF-8 byte-order mark and CRLF line ends are accepted.
"""

from __future__ import annotations

import bz2
import codecs
import contextlib
import gzip
import io
import json
import lzma
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, TextIO

from medtune.errors import MedtuneError

# First bytes of each compressed format read, and the command that unpacks it (for messages).
COMPRESSIONS = (
    (b"\x1f\x8b", "gzip", "gunzip -k"),
    (b"BZh", "bzip2", "bunzip2 -k"),
    (b"\xfd7zXZ\x00", "xz", "unxz -k"),
    (b"\x28\xb5\x2f\xfd", "zstd", "unzstd"),
)
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zstd")
ARCHIVES = (
    (b"PK\x03\x04", "a zip archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"Rar!\x1a\x07", "a RAR archive"),
)
BOM = b"\xef\xbb\xbf"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
HEAD_BYTES = 8192
# Bytes that UTF-8 text does not contain (tab, newlines, form feed and escape aside): a few in the head mean binary.
CONTROL_BYTES = bytes([*range(0, 9), 0x0B, *range(0x0E, 0x1B), *range(0x1C, 0x20), 0x7F])
JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")
CHUNK_BYTES = 1 << 20
# A JSON element that does not parse within this many characters is malformed (or absurd): stop there instead of
# reading the rest of the file into memory looking for its end.
MAX_ELEMENT_CHARS = 64 << 20
# Reading a first line longer than this to tell JSON Lines from a document is not worth it: it is a document.
MAX_PROBE_LINE = 16 << 20
PARQUET_BATCH_ROWS = 1024


class RawRecord(NamedTuple):
    """One record of a file as parsed JSON, before any schema is applied."""

    location: str  # file:line (JSON Lines), file[index] (array, Parquet) or file:line (key) (keyed object)
    value: Any  # the parsed JSON value; None when `error` is set
    error: str | None  # "reason|detail" when this record could not be parsed (the rest of the file is fine)
    key: str  # the record's id in a keyed object, else its line number (JSON Lines) or index (array, Parquet)


def plain_name(path: Path) -> str:
    """The file name without a compression suffix: `anatomy_test.csv.gz` -> `anatomy_test.csv`."""
    name = Path(path).name
    for suffix in COMPRESSED_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def compression_of(path: Path) -> str | None:
    """"gzip", "bzip2", "xz" or "zstd" from the file's first bytes; None for anything else."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    return next((name for magic, name, _ in COMPRESSIONS if head.startswith(magic)), None)


class _Decompressed(io.RawIOBase):
    """A decompressing stream whose corrupt or cut-off data becomes one MedtuneError naming the file."""

    def __init__(self, stream: Any, path: Path, kind: str, errors: tuple[type[BaseException], ...]) -> None:
        super().__init__()
        self._stream = stream
        self._path = path
        self._kind = kind
        self._errors = errors

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            data = self._stream.read(len(buffer))
        except self._errors as exc:
            raise MedtuneError(f"{self._path}: the {self._kind} data is corrupt or cut off ({exc}); "
                               "download or compress the file again") from None
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._stream.close()
        super().close()


class _ZstdFrames:
    """zstd frames one after another; unlike zstandard's stream reader, a file cut inside a frame is an EOFError."""

    def __init__(self, raw: BinaryIO, context: Any) -> None:
        self._raw = raw
        self._context = context
        self._frame = context.decompressobj()
        self._pending = b""
        self._started = False  # some data was fed (a file of no frames is empty, not cut)

    def read(self, n: int) -> bytes:
        while len(self._pending) < n:
            chunk = self._raw.read(CHUNK_BYTES)
            if not chunk:
                if self._started and not self._frame.eof:
                    raise EOFError("the last zstd frame ends early")
                break
            out = []
            while chunk:
                if self._frame.eof:
                    self._frame = self._context.decompressobj()
                out.append(self._frame.decompress(chunk))
                self._started = True
                chunk = self._frame.unused_data if self._frame.eof else b""
            self._pending += b"".join(out)
        data, self._pending = self._pending[:n], self._pending[n:]
        return data

    def close(self) -> None:
        self._pending = b""


def _decompressor(kind: str, raw: BinaryIO, path: Path) -> _Decompressed:
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, lzma.LZMAError)
    if kind == "gzip":
        stream: Any = gzip.GzipFile(fileobj=raw, mode="rb")
    elif kind == "bzip2":
        stream = bz2.BZ2File(raw)
    elif kind == "xz":
        stream = lzma.LZMAFile(raw)
    else:
        try:
            import zstandard
        except ImportError:
            raise MedtuneError(f"{path}: zstd-compressed; reading it needs the zstandard package: "
                               "pip install zstandard") from None
        stream = _ZstdFrames(raw, zstandard.ZstdDecompressor())
        errors += (zstandard.ZstdError,)
    return _Decompressed(stream, path, kind, errors)


@contextlib.contextmanager
def open_data(path: Path) -> Iterator[BinaryIO]:
    """The file's bytes, decompressed while read when its first bytes say it is compressed."""
    path = Path(path)
    if not path.exists():
        raise MedtuneError(f"{path}: file not found")
    if not path.is_file():
        raise MedtuneError(f"{path}: not a file")
    kind = compression_of(path)
    with open(path, "rb") as raw:
        if kind is None:
            yield raw
            return
        with io.BufferedReader(_decompressor(kind, raw, path), CHUNK_BYTES) as stream:
            yield stream


@contextlib.contextmanager
def open_text(path: Path) -> Iterator[TextIO]:
    """The file as UTF-8 text (byte-order mark dropped, newlines kept as written: what `csv` wants)."""
    check_text_file(path)
    with open_data(path) as fh:
        yield io.TextIOWrapper(fh, encoding="utf-8-sig", newline="")


def check_text_file(path: Path) -> bytes:
    """The first bytes of the (decompressed) file; MedtuneError when it is empty or not text (Parquet passes)."""
    path = Path(path)
    with open_data(path) as fh:
        head = fh.read(HEAD_BYTES)
    kind = compression_of(path)
    packed = f" after {kind} decompression" if kind else ""
    if not head:
        raise MedtuneError(f"{path}: the file is empty{packed}")
    if head.startswith(b"PAR1"):
        return head
    for magic, what in ARCHIVES:
        if head.startswith(magic):
            raise MedtuneError(f"{path}: {what}, not a data file: extract it and point at the data file inside")
    if head[257:262] == b"ustar":
        raise MedtuneError(f"{path}: a tar archive{packed}, not a data file: extract it (tar -xf) and point at the "
                           "data file inside")
    if head.startswith(UTF16_BOMS):
        raise MedtuneError(f"{path}: UTF-16 text{packed}; save it as UTF-8")
    controls = len(head) - len(head.translate(None, CONTROL_BYTES))
    undecodable = head.decode("utf-8", "replace").count("\ufffd")
    if b"\x00" in head or controls > len(head) // 100 or undecodable > len(head) // 10:
        raise MedtuneError(
            f"{path}: not a text data file{packed} (binary content in its first {len(head):,} bytes): medtune reads "
            "JSON Lines, JSON or Parquet, plain or compressed with gzip, bzip2, xz or zstd")
    return head


def iter_raw_records(path: Path) -> Iterator[RawRecord]:
    """Every record of a data file, compressed or not, as (location, parsed value, error, key).

    Problems with a single record (a line that is not JSON or not UTF-8) come back as that record's `error`;
    problems with the whole file (missing, empty, binary, a truncated array or stream) raise MedtuneError.
    """
    path = Path(path)
    head = check_text_file(path)
    if head.startswith(b"PAR1"):
        kind = compression_of(path)
        if kind is not None:
            unpack = next(cmd for _, name, cmd in COMPRESSIONS if name == kind)
            raise MedtuneError(f"{path}: a {kind}-compressed Parquet file; Parquet compresses its own columns, so "
                               f"unpack it first ({unpack} {path.name})")
        yield from _iter_parquet(path)
        return
    first = head.removeprefix(BOM).lstrip()[:1]
    if first == b"[":
        yield from _iter_json_array(path)
    elif first == b"{" and _is_json_document(path):
        yield from _iter_json_object(path)
    else:
        yield from _iter_jsonl(path)


def read_json_document(path: Path) -> Any:
    """A whole (small) JSON document, compressed or not; MedtuneError with the line when it does not parse."""
    check_text_file(path)
    try:
        with open_data(path) as fh:
            return json.loads(fh.read().removeprefix(BOM).decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise MedtuneError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise MedtuneError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None


def _parse_object_line(raw: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(raw.removeprefix(BOM).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _is_json_document(path: Path) -> bool:
    """Whether a file starting with '{' is one JSON document (pretty-printed, or a one-line keyed object)."""
    lines: list[bytes] = []
    with open_data(path) as fh:
        while len(lines) < 2:
            raw = fh.readline(MAX_PROBE_LINE)
            if not raw:
                break
            if len(raw) == MAX_PROBE_LINE and not raw.endswith(b"\n"):
                return True
            if raw.strip():
                lines.append(raw)
    first = _parse_object_line(lines[0])
    if first is not None:
        # a file of one line holding {id: {record}, ...} is a keyed document; anything else that parses is JSONL
        return len(lines) == 1 and bool(first) and all(isinstance(v, dict) for v in first.values())
    # The first line is not a whole object: a pretty-printed document, unless it is JSON Lines with a broken first
    # line (then the second line is an object of its own).
    return len(lines) == 1 or _parse_object_line(lines[1]) is None


def _iter_jsonl(path: Path) -> Iterator[RawRecord]:
    lineno = 0
    with open_data(path) as fh:
        for lineno, raw in enumerate(fh, start=1):
            location = f"{path.name}:{lineno}"
            if lineno == 1:
                raw = raw.removeprefix(BOM)
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                yield RawRecord(location, None, f"not UTF-8|{exc.reason} at byte {exc.start}", str(lineno))
                continue
            if not line:
                continue  # blank lines are not records
            try:
                yield RawRecord(location, json.loads(line), None, str(lineno))
            except json.JSONDecodeError as exc:
                yield RawRecord(location, None, f"malformed JSON|{exc.msg} at column {exc.colno}", str(lineno))


class _TextWindow:
    """The not yet parsed text of a UTF-8 stream: a window that grows at its end and drops what was consumed."""

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

    def value(self, decoder: json.JSONDecoder, index: int, kind: str = "array") -> Any:
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
                        f"is the {kind} truncated?"
                    ) from None
                if len(self.text) - self.pos > MAX_ELEMENT_CHARS:
                    raise MedtuneError(
                        f"{self.path}:{self.current_line()}: element {index} does not parse within "
                        f"{MAX_ELEMENT_CHARS:,} characters ({exc.msg}): not valid JSON, or far too long for a record"
                    ) from None
            # Grow geometrically so a large element is re-parsed only a few times.
            self.read_more(max(self.chunk_bytes, len(self.text) - self.pos))

    def separator(self, index: int, closing: str, kind: str) -> str:
        """After element `index`: consume a ',' (a value must follow) and return the next character."""
        char = self.next_char()
        if char == ",":
            self.pos += 1
            char = self.next_char()
            if char in (closing, ""):
                raise MedtuneError(f"{self.path}:{self.current_line()}: not valid JSON (a value must follow ',' "
                                   f"after element {index}); is the {kind} truncated?")
        elif char not in (closing, ""):
            raise MedtuneError(f"{self.path}:{self.current_line()}: not valid JSON (expected ',' or '{closing}' "
                               f"after element {index}, got {char!r})")
        return char

    def end(self, kind: str, closing: str) -> None:
        self.pos += 1
        if self.next_char() != "":
            raise MedtuneError(f"{self.path}:{self.current_line()}: not valid JSON (extra data after the {kind}'s "
                               f"'{closing}')")


def _iter_json_array(path: Path, chunk_bytes: int = CHUNK_BYTES) -> Iterator[RawRecord]:
    """The elements of a top-level JSON array, holding about one chunk plus one element in memory."""
    decoder = json.JSONDecoder()
    with open_data(path) as fh:
        window = _TextWindow(fh, path, chunk_bytes)
        if window.next_char() != "[":
            raise MedtuneError(f"{path}: not a JSON array")
        window.pos += 1
        index = 0
        char = window.next_char()
        while char != "]":
            if char == "":
                raise MedtuneError(f"{path}: the JSON array ends without ']' after {index} elements; is it truncated?")
            yield RawRecord(f"{path.name}[{index}]", window.value(decoder, index), None, str(index))
            char = window.separator(index, "]", "array")
            index += 1
        window.end("array", "]")


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _iter_json_object(path: Path, chunk_bytes: int = CHUNK_BYTES) -> Iterator[RawRecord]:
    """The records of a top-level JSON object keyed by id, streamed like an array's elements."""
    decoder = json.JSONDecoder()
    with open_data(path) as fh:
        window = _TextWindow(fh, path, chunk_bytes)
        if window.next_char() != "{":
            raise MedtuneError(f"{path}: not a JSON object")
        window.pos += 1
        index = 0
        char = window.next_char()
        while char != "}":
            if char == "":
                raise MedtuneError(f"{path}: the JSON object ends without '}}' after {index} records; is it truncated?")
            line = window.current_line()
            if char != '"':
                raise MedtuneError(f"{path}:{line}: not valid JSON (expected a key in quotes, got {char!r})")
            key = window.value(decoder, index, "object")
            if window.next_char() != ":":
                raise MedtuneError(f"{path}:{window.current_line()}: not valid JSON (expected ':' after key {key!r})")
            window.pos += 1
            window.next_char()
            value = window.value(decoder, index, "object")
            if not isinstance(value, dict):
                raise MedtuneError(
                    f"{path}:{line}: key {key!r} holds {_type_name(value)}, not a record: a JSON document holding "
                    "one object must map ids to records ({\"id\": {...}, ...}); write other data as JSON Lines "
                    "(one record a line) or as a JSON array of records")
            yield RawRecord(f"{path.name}:{line} ({key})", value, None, key)
            char = window.separator(index, "}", "object")
            index += 1
        window.end("object", "}")


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
                yield RawRecord(f"{path.name}[{index}]", row, None, str(index))
                index += 1
    except (pyarrow.ArrowException, OSError) as exc:
        raise MedtuneError(f"{path}: not a readable Parquet file ({exc})") from None
