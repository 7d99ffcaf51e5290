"""The data stage entry point: records -> tokenized, masked train/validation arrays plus a report.

Output folder `prepared/`:
  train.ids.npy, train.mask.npy, train.offsets.npy   flat int32 token ids, uint8 loss mask, int64 example offsets
  train.packs.npy, train.pack_offsets.npy            with data.packing: example indices of each packed row
  val.*.npy                                          the same for the validation split
  report.json                                        counts (read = used + rejected), lengths, truncation, packing
  rejected.jsonl                                     every rejected record: location, reason, detail
  contamination.jsonl                                training records that match an evaluation question

Records stream through in batches (tokenized together, which uses every core); memory holds the token arrays
(5 bytes a token) and no Python object per token. The split is decided per record from a hash of its content and
the seed, so it does not depend on the order or the size of the file.

With data.balance_letters (the default) multiple-choice conversations are re-lettered as they stream through
(`medtune.formats.relabel`), so that their gold letters come out uniform; report.json's `letters` says how many were
re-lettered, kept as they were and why, and the gold-letter shares before and after.

With train.objective dpo or orpo the records are preference pairs, prepared by data/pair_records.py into the same files.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import replace
from itertools import islice
from pathlib import Path
from typing import Any

from medtune.artifacts import RunDir, atomic_write_json
from medtune.config import Config
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
)
from medtune.data.formatting import ChatFormatter
from medtune.data.sources import Conversation, Rejection, read_hub_records, read_records
from medtune.errors import MedtuneError
from medtune.formats.relabel import Balancer, LetterStats, balance_messages
from medtune.models import load_tokenizer, resolve_base
from medtune.ui import UI


def read_source(cfg: Config) -> tuple[str, Iterator[Conversation | Rejection]]:
    """What the data stage reads (a file, or one split of a hub dataset streamed when data.data_file is unset) and
    its records; a hub dataset that can't be reached or read is one error now, before any long step."""
    dc = cfg.data
    if cfg.pairs is None and dc.dataset is not None and dc.data_file is None:
        records = read_hub_records(dc.dataset, dc.config, dc.split, dc.revision, dc.schema_, dc.max_chars)
        return f"{dc.dataset}{'/' + dc.config if dc.config else ''}:{dc.split}", records
    source = data_path(cfg)
    return str(source), read_records(source, dc.schema_, dc.max_chars)


def balanced(records: Iterable[Conversation | Rejection], balancer: Balancer | None,
             stats: LetterStats) -> Iterator[Conversation | Rejection]:
    """The records with multiple-choice conversations re-lettered (`balancer` None: only counted in `stats`)."""
    for record in records:
        if isinstance(record, Conversation):
            messages = balance_messages(record.messages, balancer, stats, record.location)
            if messages is not record.messages:
                record = replace(record, messages=messages, origin=record.messages)
        yield record


def is_validation(conv: Conversation, seed: int, fraction: float) -> bool:
    digest = hashlib.blake2b(json.dumps(conv.origin or conv.messages, sort_keys=True).encode(), digest_size=8,
                             key=str(seed).encode()).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def run(cfg: Config, run_dir: RunDir, out: Path, ui: UI) -> dict[str, Any]:
    """Prepare the data into `out` (an empty folder); return the report."""
    if cfg.train.objective != "sft":
        from medtune.data.pair_records import prepare_pairs  # pair_records.py builds on this module's writer

        return prepare_pairs(cfg, out, ui)
    if cfg.data.schema_ == "pairs":
        raise MedtuneError("data.schema is 'pairs' but train.objective is 'sft': set train.objective to dpo or orpo "
                           "to train on preference pairs")
    dc = cfg.data
    source, records = read_source(cfg)
    tokenizer = load_tokenizer(resolve_base(cfg.base.model, cfg.base.revision), cfg.base.chat_template)
    formatter = ChatFormatter(tokenizer, dc.system_prompt)
    guard = contamination_guard(cfg)
    splits = {"train": SplitWriter(), "val": SplitWriter()}
    rejected: list[Rejection] = []
    contaminated: list[dict[str, Any]] = []
    lengths: list[int] = []
    counts = Counter()
    if dc.limit is not None:
        records = islice(records, dc.limit)
    letters = LetterStats()
    records = balanced(records, Balancer(cfg.seed) if dc.balance_letters else None, letters)

    for batch in batches(records, BATCH):
        counts["read"] += len(batch)
        rejected += [r for r in batch if isinstance(r, Rejection)]
        convs = [c for c in batch if isinstance(c, Conversation)]
        for conv, enc in zip(convs, formatter.encode_batch([list(c.messages) for c in convs])):
            if dropped_as_contaminated(guard, conv.location, conv.messages, dc.contamination, contaminated, rejected):
                continue
            lengths.append(len(enc.input_ids))
            counts["over_max_len"] += len(enc.input_ids) > dc.max_len
            question = next(m["content"] for m in reversed(conv.messages) if m["role"] == "user")
            fitted = length_policy.fit(enc, conv.messages[-1]["content"], question, dc.max_len, dc.length_policy,
                                       formatter, counts)
            if fitted is None:
                rejected.append(Rejection(conv.location, *length_policy.too_long(
                    dc.length_policy, len(enc.input_ids), enc.reply_spans[-1][0])))
                continue
            enc = fitted
            if not any(enc.loss_mask):
                rejected.append(Rejection(conv.location, "no assistant token left inside data.max_len"))
                continue
            counts["used"] += 1
            splits["val" if is_validation(conv, cfg.seed, dc.val_fraction) else "train"].add(enc)

    split_info = finish(out, source, dc, splits, rejected, contaminated, counts["used"], dc.packing)

    over = counts["over_max_len"]
    report = {
        **report_head(str(source), "conversations", counts["read"], counts["used"], rejected, split_info, dc),
        "lengths": percentiles(lengths),
        "over_max_len": over,
        "share_over_max_len": round(over / max(1, len(lengths)), 4),
        "truncated": counts["truncated"],
        "truncated_answer_cut": counts["truncated_answer_cut"],
        "shortened_keep_answer": counts["shortened_keep_answer"],
        **report_tail(contaminated, dc, formatter.eot, tokenizer.pad_token),
        "letters": letters.report(dc.balance_letters),  # every record read as a conversation, before length checks
    }
    atomic_write_json(out / "report.json", report)
    ui.log(f"data: {counts['used']} of {counts['read']} records used ({len(rejected)} rejected); "
           f"{over} over {dc.max_len} tokens: {counts['truncated']} truncated ({counts['truncated_answer_cut']} lost "
           f"their final answer), {counts['shortened_keep_answer']} shortened keeping the answer")
    ui.log(f"data: {'balance_letters' if dc.balance_letters else 'balance_letters off'}: {letters.summary()}")
    log_contamination(ui, contaminated, dc, "training record(s)")
    return report
