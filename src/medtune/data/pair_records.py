"""Preference pairs in the data stage (train.objective dpo or orpo): reading pair records, encoding, writing them.

Shapes (TRL's), judged record by record:
- plain text `{"prompt": str, "chosen": str, "rejected": str}`: the prompt is one user turn, each reply one
  assistant turn;
- conversational `{"prompt": [messages], "chosen": [messages], "rejected": [messages]}`: the prompt ends with a user
  turn (a system turn may only come first; earlier assistant turns are context, never trained on), chosen and
  rejected are each one assistant turn. A string field reads as one turn, so the two shapes may mix;
- implicit prompt `{"chosen": [conversation], "rejected": [conversation]}` without "prompt": the prompt is every turn
  but the last, which must be the same in both; the last turn of each is its assistant reply.
An optional "id" (string or number) is kept: `prepared/{split}.pairs.jsonl` gives each pair's location and id.
Messages are `{"role", "content"}` with the roles and checks of sources.py; texts are stripped.

Every record becomes a `Pair` or a `Rejection` with its location and a short reason, as SFT records do: a record
without "chosen" and "rejected" is "not a preference pair"; empty replies, identical replies, exact duplicates (same
prompt and replies) and records over `max_chars` characters are rejected.

Encoding: each side is the SFT encoding of prompt + reply (ChatFormatter, segment by segment), with loss only on the
final reply and its end-of-turn token. Those ids must equal the start of the whole rendered conversation's ids (the
chat template applied to prompt + reply, tokenized as one text): where the template's text merges with the reply's
edges in tokenization, training would score ids the model never sees, so a mismatch stops the stage.

Output (prepared/): the SFT files `{split}.ids.npy`, `{split}.mask.npy`, `{split}.offsets.npy`, where example 2k is
pair k's chosen conversation and 2k+1 its rejected one; never packed (the trainer puts the two of a pair in one row
itself). A pair's split comes from a hash of its prompt and the seed, so all pairs of one question share a split.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from medtune.answers import final_answer
from medtune.artifacts import atomic_write_json
from medtune.config import Config, DataConfig
from medtune.data import lengths as length_policy
from medtune.data.common import (
    BATCH,
    SplitWriter,
    batches,
    contamination_guard,
    data_path,
    dropped_as_contaminated,
    finish,
    log_contamination,
    percentiles,
    report_head,
    report_tail,
    write_jsonl,
)
from medtune.data.formatting import ChatFormatter, Encoded
from medtune.data.sources import DEFAULT_MAX_CHARS, ROLES, Rejection, _BadRecord, _describe_keys, _text, detect_schema
from medtune.errors import MedtuneError
from medtune.formats.files import RawRecord, check_text_file, iter_raw_records
from medtune.formats.relabel import shares
from medtune.models import load_tokenizer, resolve_base
from medtune.ui import UI

SIDES = ("chosen", "rejected")
Messages = tuple[dict[str, str], ...]


@dataclass(frozen=True)
class Pair:
    location: str  # file:line or file[index]
    prompt: Messages  # ends with a user turn
    chosen: str
    rejected: str
    id: str | None = None
    schema: str = "pairs"

    def conversation(self, side: str) -> list[dict[str, str]]:
        return [*self.prompt, {"role": "assistant", "content": getattr(self, side)}]

    def question(self) -> str:
        """The user turn the replies answer (the prompt's last)."""
        return self.prompt[-1]["content"]


def is_pair_record(obj: dict[str, Any]) -> bool:
    """Judged as the SFT reader judges schemas: "chosen" or "rejected" marks a pair."""
    return detect_schema(obj) == "pairs"


# ---- reading ----


def _field(obj: dict[str, Any], key: str) -> str | list:
    if key not in obj:
        raise _BadRecord(f"field '{key}' is missing")
    value = obj[key]
    if value is None:
        raise _BadRecord(f"field '{key}' is null")
    if not isinstance(value, (str, list)):
        raise _BadRecord(f"field '{key}' must be a string or a list of messages", f"got {type(value).__name__}")
    return value


def _turns(value: list, key: str) -> list[dict[str, str]]:
    if not value:
        raise _BadRecord(f"field '{key}' is empty")
    turns = []
    for n, turn in enumerate(value, start=1):
        where = f"{key} turn {n}"
        if not isinstance(turn, dict):
            raise _BadRecord("turn is not a JSON object", f"{where}, got {type(turn).__name__}")
        name = _text(turn, "role", where)
        role = ROLES.get(name.lower())
        if role is None:
            raise _BadRecord(f"unknown role {name[:40]!r}", where)
        if role == "system" and n > 1:
            raise _BadRecord("system turn after the first turn", where)
        turns.append({"role": role, "content": _text(turn, "content", where)})
    return turns


def _check_prompt(turns: list[dict[str, str]], where: str) -> Messages:
    roles = [t["role"] for t in turns]
    first = 1 if roles[0] == "system" else 0
    if first == len(roles):
        raise _BadRecord("prompt has no user turn", where)
    if roles[first] != "user":
        raise _BadRecord("prompt does not start with a user turn", f"{where} turn {first + 1} is '{roles[first]}'")
    if roles[-1] != "user":
        raise _BadRecord("prompt does not end with a user turn", f"{where} turn {len(roles)} is '{roles[-1]}'")
    return tuple(turns)


def _reply(obj: dict[str, Any], key: str) -> str:
    value = _field(obj, key)
    if isinstance(value, str):
        return _text(obj, key)
    turns = _turns(value, key)
    if len(turns) != 1 or turns[0]["role"] != "assistant":
        roles = ", ".join(t["role"] for t in turns)
        raise _BadRecord(f"field '{key}' must be one assistant turn", f"got {len(turns)} turn(s): {roles}")
    return turns[0]["content"]


def _implicit(obj: dict[str, Any]) -> tuple[Messages, str, str]:
    """Prompt and replies of `{"chosen": [conversation], "rejected": [conversation]}`."""
    convs = {}
    for key in SIDES:
        value = _field(obj, key)
        if isinstance(value, str):
            raise _BadRecord("field 'prompt' is missing", "plain-text replies need a prompt; only message lists "
                                                          "carry an implicit one")
        turns = _turns(value, key)
        if turns[-1]["role"] != "assistant":
            raise _BadRecord("conversation does not end with an assistant turn",
                             f"{key} turn {len(turns)} is '{turns[-1]['role']}'")
        convs[key] = turns
    chosen, rejected = convs["chosen"], convs["rejected"]
    if chosen[:-1] != rejected[:-1]:
        differ = next((n for n, (a, b) in enumerate(zip(chosen, rejected), start=1) if a != b), None)
        detail = (f"turn {differ}" if differ is not None and differ < min(len(chosen), len(rejected))
                  else f"chosen has {len(chosen)} turns, rejected {len(rejected)}")
        raise _BadRecord("chosen and rejected differ before their final turn", detail)
    if len(chosen) == 1:
        raise _BadRecord("prompt has no user turn", "implicit prompt: each conversation is a single reply")
    return _check_prompt(chosen[:-1], "implicit prompt"), chosen[-1]["content"], rejected[-1]["content"]


def parse_pair(obj: dict[str, Any]) -> tuple[Messages, str, str, str | None]:
    """(prompt, chosen, rejected, id) of a pair record; raises _BadRecord."""
    if "prompt" in obj:
        value = _field(obj, "prompt")
        prompt = ({"role": "user", "content": _text(obj, "prompt")},) if isinstance(value, str) else \
            _check_prompt(_turns(value, "prompt"), "prompt")
        chosen, rejected = _reply(obj, "chosen"), _reply(obj, "rejected")
    else:
        prompt, chosen, rejected = _implicit(obj)
    if chosen == rejected:
        raise _BadRecord("chosen and rejected are identical")
    pair_id = obj.get("id")
    if pair_id is not None:
        if isinstance(pair_id, bool) or not isinstance(pair_id, (str, int, float)):
            raise _BadRecord("field 'id' must be a string or a number", f"got {type(pair_id).__name__}")
        pair_id = str(pair_id)
    return prompt, chosen, rejected, pair_id


def _digest(prompt: Messages, chosen: str, rejected: str) -> bytes:
    canonical = json.dumps([[[m["role"], m["content"]] for m in prompt], chosen, rejected], ensure_ascii=False,
                           separators=(",", ":"))
    return hashlib.blake2b(canonical.encode("utf-8"), digest_size=16).digest()


def read_pairs(path: Path, max_chars: int = DEFAULT_MAX_CHARS) -> Iterator[Pair | Rejection]:
    """Every record of `path` (any layout or compression the SFT reader takes) as a Pair or a Rejection. A missing,
    empty or binary file is an error at once."""
    if max_chars <= 0:
        raise MedtuneError(f"max_chars must be > 0, got {max_chars}")
    check_text_file(path)
    return pairs_from(iter_raw_records(path), max_chars)


def pairs_from(raw: Iterable[RawRecord], max_chars: int = DEFAULT_MAX_CHARS) -> Iterator[Pair | Rejection]:
    """Pairs and Rejections from raw records, in their order; exact duplicates are rejected after the first."""
    seen: set[bytes] = set()
    for location, obj, error, _ in raw:
        if error is not None:
            reason, _, detail = error.partition("|")
            yield Rejection(location, reason, detail)
            continue
        if not isinstance(obj, dict):
            yield Rejection(location, "record is not a JSON object", type(obj).__name__)
            continue
        schema = detect_schema(obj)
        if schema != "pairs":
            detail = f"reads as {schema}" if schema else _describe_keys(obj)
            yield Rejection(location, "not a preference pair: it needs 'chosen' and 'rejected'", detail,
                            schema or "")
            continue
        try:
            prompt, chosen, rejected, pair_id = parse_pair(obj)
        except _BadRecord as bad:
            yield Rejection(location, bad.reason, bad.detail, "pairs")
            continue
        chars = sum(len(m["content"]) for m in prompt) + len(chosen) + len(rejected)
        if chars > max_chars:
            yield Rejection(location, "record too long", f"{chars:,} characters, the cap is {max_chars:,}", "pairs")
            continue
        digest = _digest(prompt, chosen, rejected)
        if digest in seen:
            yield Rejection(location, "exact duplicate of an earlier record", "", "pairs")
            continue
        seen.add(digest)
        yield Pair(location, prompt, chosen, rejected, pair_id)


def file_record_kind(path: Path) -> str:
    """"pairs" when the first JSON object of `path` is a pair record, else "conversations"."""
    for record in iter_raw_records(path):
        if isinstance(record.value, dict):
            return "pairs" if is_pair_record(record.value) else "conversations"
    return "conversations"


# ---- encoding ----


def _final_reply_only(enc: Encoded) -> Encoded:
    """Loss on the last reply alone: assistant turns inside a prompt are context."""
    start = enc.reply_spans[-1][0]
    return Encoded(enc.input_ids, [0] * start + enc.loss_mask[start:], enc.reply_spans[-1:])


def _template_mismatch(formatter: ChatFormatter, pair: Pair, side: str, ours: list[int], whole: list[int]) -> str:
    at = next((i for i, (a, b) in enumerate(zip(ours, whole)) if a != b), min(len(ours), len(whole)))
    tokens = formatter.tokenizer.convert_ids_to_tokens
    return (f"{pair.location}: field '{side}': the reply's token ids differ from the chat template's at token {at} "
            f"(whole rendered conversation: {tokens(whole[at:at + 3])}, prompt and reply tokenized apart: "
            f"{tokens(ours[at:at + 3])}); the template's text merges with the reply's edge, so its log-probabilities "
            "would be scored on ids the model never sees: use a chat template that ends the assistant header with "
            "a separator (a newline), or another base model")


def encode_pairs(formatter: ChatFormatter, pairs: list[Pair]) -> list[tuple[Encoded, Encoded]]:
    """(chosen, rejected) encodings of each pair; raises MedtuneError where the chat template disagrees."""
    conversations = [pair.conversation(side) for pair in pairs for side in SIDES]
    encoded = [_final_reply_only(enc) for enc in formatter.encode_batch(conversations)]
    # What apply_chat_template(tokenize=True) gives, tokenized in one batch.
    rendered = [formatter.tokenizer.apply_chat_template(formatter.with_system(c), tokenize=False)
                for c in conversations]
    for k, (enc, whole) in enumerate(zip(encoded, formatter.tokenize(rendered))):
        if whole[: len(enc.input_ids)] != enc.input_ids:
            raise MedtuneError(_template_mismatch(formatter, pairs[k // 2], SIDES[k % 2], enc.input_ids, whole))
    return list(zip(encoded[0::2], encoded[1::2]))


def _is_validation(pair: Pair, seed: int, fraction: float) -> bool:
    digest = hashlib.blake2b(json.dumps(pair.prompt, sort_keys=True).encode(), digest_size=8,
                             key=str(seed).encode()).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def _fit_pair(pair: Pair, encs: list[Encoded], dc: DataConfig, formatter: ChatFormatter,
              stats: dict[str, Counter]) -> tuple[list[Encoded], tuple[str, str] | None]:
    """Both replies within data.max_len by the length policy (counted per side), or why the pair cannot be kept."""
    fitted = [length_policy.fit(enc, getattr(pair, side), pair.question(), dc.max_len, dc.length_policy,
                                formatter, stats[side]) for side, enc in zip(SIDES, encs)]
    prompt = f"{encs[0].reply_spans[-1][0]} prompt tokens"
    if None in fitted:
        over = ", ".join(f"{side} {len(enc.input_ids)} tokens" for side, enc in zip(SIDES, encs)
                         if len(enc.input_ids) > dc.max_len)
        return fitted, (("longer than data.max_len", over) if dc.length_policy == "drop"
                        else ("prompt leaves no room for the answer", prompt))
    if not all(any(enc.loss_mask) for enc in fitted):
        return fitted, ("no assistant token left inside data.max_len", prompt)
    if fitted[0].input_ids == fitted[1].input_ids:
        return fitted, ("chosen and rejected are identical inside data.max_len", f"{dc.max_len} tokens")
    return fitted, None


def _reply_facts(lengths: list[int], stats: Counter) -> dict[str, Any]:
    """One side's lengths (whole conversations, before the length policy) and what the policy did to it."""
    return {"lengths": percentiles(lengths), "over_max_len": stats["over_max_len"],
            "share_over_max_len": round(stats["over_max_len"] / max(1, len(lengths)), 4),
            "truncated": stats["truncated"], "truncated_answer_cut": stats["truncated_answer_cut"],
            "shortened_keep_answer": stats["shortened_keep_answer"]}


def prepare_pairs(cfg: Config, out: Path, ui: UI) -> dict[str, Any]:
    """The data stage for preference pairs: write prepared/ into `out`; return the report."""
    dc = cfg.data
    if dc.schema_ not in ("auto", "pairs"):
        raise MedtuneError(f"data.schema {dc.schema_!r} holds conversations, but train.objective "
                           f"{cfg.train.objective!r} trains on preference pairs: set data.schema to pairs (or auto), "
                           "or train.objective to sft")
    if dc.dataset is not None and dc.data_file is None:
        raise MedtuneError("data.data_file: preference pairs are read from a file; name the hub dataset's file "
                           "(streaming a dataset's split is for conversations)")
    source = data_path(cfg)
    tokenizer = load_tokenizer(resolve_base(cfg.base.model, cfg.base.revision), cfg.base.chat_template)
    formatter = ChatFormatter(tokenizer, dc.system_prompt)
    guard = contamination_guard(cfg)
    splits = {"train": SplitWriter(), "val": SplitWriter()}
    index: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
    rejected: list[Rejection] = []
    contaminated: list[dict[str, Any]] = []
    lengths: dict[str, list[int]] = {side: [] for side in SIDES}
    stats = {side: Counter() for side in SIDES}
    answers = {side: Counter() for side in SIDES}  # the option letter each used reply settles on
    read = 0
    records: Iterator[Pair | Rejection] = read_pairs(source, dc.max_chars)
    if dc.limit is not None:
        records = islice(records, dc.limit)

    for batch in batches(records, BATCH):
        read += len(batch)
        rejected += [r for r in batch if isinstance(r, Rejection)]
        pairs = [p for p in batch if isinstance(p, Pair)]
        for pair, encs in zip(pairs, encode_pairs(formatter, pairs)):
            if dropped_as_contaminated(guard, pair.location, pair.prompt, dc.contamination, contaminated, rejected,
                                       "pairs"):
                continue
            for side, enc in zip(SIDES, encs):
                lengths[side].append(len(enc.input_ids))
                stats[side]["over_max_len"] += len(enc.input_ids) > dc.max_len
            fitted, problem = _fit_pair(pair, encs, dc, formatter, stats)
            if problem is not None:
                rejected.append(Rejection(pair.location, *problem, "pairs"))
                continue
            split = "val" if _is_validation(pair, cfg.seed, dc.val_fraction) else "train"
            for enc in fitted:  # 2k chosen, 2k+1 rejected
                splits[split].add(enc)
            index[split].append({"location": pair.location, "id": pair.id})
            for side in SIDES:
                answers[side][final_answer(getattr(pair, side), pair.question()) or "none"] += 1

    used = len(index["train"]) + len(index["val"])
    split_info = finish(out, str(source), dc, splits, rejected, contaminated, used, False, "preference pair")
    for name, rows in index.items():
        write_jsonl(out / f"{name}.pairs.jsonl", rows)

    replies = {side: _reply_facts(lengths[side], stats[side]) for side in SIDES}
    report = {
        **report_head(str(source), "pairs", read, used, rejected, split_info, dc),
        "pairs": {name: len(rows) for name, rows in index.items()},
        "replies": replies,  # lengths: whole conversations (prompt + that reply), before data.length_policy
        # pairs are balanced where they are made (`medtune pairs`, pairs.balance_letters), not re-lettered here
        "letters": {f"{side}_answer_shares": shares(answers[side]) for side in SIDES},
        "packing": False,
        **report_tail(contaminated, dc, formatter.eot, tokenizer.pad_token),
    }
    atomic_write_json(out / "report.json", report)
    cut = {side: stats[side]["truncated_answer_cut"] for side in SIDES}
    ui.log(f"data: {used} of {read} records used as preference pairs ({len(rejected)} rejected); over "
           f"{dc.max_len} tokens: {replies['chosen']['over_max_len']} chosen, {replies['rejected']['over_max_len']} "
           f"rejected ({dc.length_policy}; final answer cut: {cut['chosen']} chosen, {cut['rejected']} rejected)")
    if dc.packing:
        ui.log("data: data.packing does not apply to pairs (training puts the two replies of a pair in one row)")
    log_contamination(ui, contaminated, dc, "pair(s)")
    return report
