"""The data stage entry point: records -> tokenized, masked train/validation arrays plus a report.

Output folder `prepared/`:
  train.ids.npy, train.mask.npy, train.offsets.npy   flat int32 token ids, uint8 loss mask, int64 row offsets
  val.*.npy                                          the same for the validation split
  report.json                                        counts (read = used + rejected), lengths, truncation
  rejected.jsonl                                     every rejected record: location and reason
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from medtune.artifacts import RunDir, atomic_write_json
from medtune.config import Config
from medtune.data.formatting import ChatFormatter, final_answer
from medtune.data.sources import Conversation, Rejection, hub_data_file, read_records
from medtune.errors import MedtuneError
from medtune.models import load_tokenizer, resolve_base
from medtune.ui import UI


def data_path(cfg: Config) -> Path:
    if cfg.data.path is not None:
        return cfg.data.path
    return hub_data_file(cfg.data.dataset, cfg.data.data_file, cfg.data.revision)


def _percentiles(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {}
    arr = np.asarray(lengths)
    return {f"p{q}": float(np.percentile(arr, q)) for q in (50, 90, 99)} | {"max": int(arr.max())}


def _write_split(out: Path, name: str, rows: list[tuple[list[int], list[int]]]) -> None:
    lengths = np.array([len(ids) for ids, _ in rows], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.fromiter((t for r, _ in rows for t in r), dtype=np.int32, count=int(offsets[-1]))
    mask = np.fromiter((m for _, r in rows for m in r), dtype=np.uint8, count=int(offsets[-1]))
    np.save(out / f"{name}.ids.npy", ids)
    np.save(out / f"{name}.mask.npy", mask)
    np.save(out / f"{name}.offsets.npy", offsets)


def load_split(prepared: Path, name: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """The rows of a prepared split as (ids, mask) array views."""
    ids = np.load(prepared / f"{name}.ids.npy", mmap_mode="r")
    mask = np.load(prepared / f"{name}.mask.npy", mmap_mode="r")
    offsets = np.load(prepared / f"{name}.offsets.npy")
    return [(ids[a:b], mask[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]


def run(cfg: Config, run_dir: RunDir, out: Path, ui: UI) -> dict[str, Any]:
    """Prepare the data into `out` (an empty folder); return the report."""
    source = data_path(cfg)
    tokenizer = load_tokenizer(resolve_base(cfg.base.model, cfg.base.revision))
    formatter = ChatFormatter(tokenizer, cfg.data.system_prompt)
    max_len = cfg.data.max_len

    rows: list[tuple[list[int], list[int]]] = []
    rejected: list[Rejection] = []
    lengths: list[int] = []
    truncated = answer_cut = read = 0
    for item in read_records(source, cfg.data.schema_):
        if cfg.data.limit is not None and read >= cfg.data.limit:
            break
        read += 1
        if isinstance(item, Rejection):
            rejected.append(item)
            continue
        assert isinstance(item, Conversation)
        enc = formatter.encode(list(item.messages))
        lengths.append(len(enc.input_ids))
        if len(enc.input_ids) > max_len:
            if cfg.data.length_policy == "drop":
                rejected.append(Rejection(item.location, "longer than data.max_len", f"{len(enc.input_ids)} tokens"))
                continue
            truncated += 1
            kept = [t for t, m in zip(enc.input_ids[:max_len], enc.loss_mask[:max_len]) if m]
            full_answer = final_answer(item.messages[-1]["content"])
            if full_answer is not None and final_answer(tokenizer.decode(kept)) != full_answer:
                answer_cut += 1
            enc.input_ids, enc.loss_mask = enc.input_ids[:max_len], enc.loss_mask[:max_len]
        if not any(enc.loss_mask):
            rejected.append(Rejection(item.location, "no assistant token left inside data.max_len"))
            continue
        rows.append((enc.input_ids, enc.loss_mask))

    if cfg.data.strict and rejected:
        shown = "; ".join(str(r) for r in rejected[:3])
        raise MedtuneError(f"{source}: {len(rejected)} record(s) rejected and data.strict is on: {shown}", exit_code=1)
    if not rows:
        raise MedtuneError(f"{source}: no usable record ({len(rejected)} rejected; see {out / 'rejected.jsonl'})")
    order = np.random.default_rng(cfg.seed).permutation(len(rows))
    n_val = min(len(rows) - 1, max(1, round(len(rows) * cfg.data.val_fraction))) if cfg.data.val_fraction else 0
    val = [rows[i] for i in order[:n_val]]
    train = [rows[i] for i in sorted(order[n_val:])]
    _write_split(out, "train", train)
    _write_split(out, "val", val)
    with open(out / "rejected.jsonl", "w", encoding="utf-8") as fh:
        for r in rejected:
            fh.write(json.dumps(asdict(r), ensure_ascii=False) + "\n")

    report = {
        "source": str(source),
        "records_read": read,
        "used": len(rows),
        "rejected": len(rejected),
        "rejected_by_reason": dict(Counter(r.reason for r in rejected).most_common()),
        "train_rows": len(train),
        "val_rows": len(val),
        "train_tokens": int(sum(len(ids) for ids, _ in train)),
        "trained_tokens": int(sum(sum(m) for _, m in train)),
        "max_len": max_len,
        "length_policy": cfg.data.length_policy,
        "lengths": _percentiles(lengths),
        "over_max_len": sum(n > max_len for n in lengths),
        "share_over_max_len": round(sum(n > max_len for n in lengths) / max(1, len(lengths)), 4),
        "truncated": truncated,
        "truncated_answer_cut": answer_cut,
        "end_of_turn_token": formatter.eot,
        "pad_token": tokenizer.pad_token,
        "system_prompt": cfg.data.system_prompt,
    }
    atomic_write_json(out / "report.json", report)
    ui.log(f"data: {len(rows)} of {read} records used ({len(rejected)} rejected), {truncated} truncated at "
           f"{max_len} tokens ({answer_cut} lost their final answer)")
    return report
