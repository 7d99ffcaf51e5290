"""What the data stage's two record kinds (conversations: stage.py; preference pairs: pair_records.py) share: the source
path, the contamination guard, batching, length percentiles, the writer of a split's arrays and the stage's last
step (strict, nothing usable, the files written)."""

from __future__ import annotations

import json
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from medtune.artifacts import PAIRS, RunDir
from medtune.config import Config, DataConfig
from medtune.contamination import ContaminationGuard, guard_for, question_stem
from medtune.data.formatting import Encoded
from medtune.data.packing import efficiency, pack
from medtune.data.sources import Rejection
from medtune.errors import MedtuneError
from medtune.hub import hub_file

BATCH = 512


def data_path(cfg: Config) -> Path:
    if cfg.pairs is not None:  # the pairs stage's output
        return RunDir(cfg.run_dir).require(PAIRS, "medtune pairs CONFIG") / "pairs.jsonl"
    if cfg.data.path is not None:
        return cfg.data.path
    return Path(hub_file(cfg.data.dataset, cfg.data.data_file, cfg.data.revision))


def _as_numpy(buffer: array, dtype: type) -> np.ndarray:
    return np.frombuffer(buffer, dtype=dtype) if len(buffer) else np.zeros(0, dtype)


class SplitWriter:
    """Accumulates one split's examples as flat typed arrays and writes them as .npy files."""

    def __init__(self) -> None:
        self.ids = array("i")
        self.mask = array("B")
        self.lengths = array("q")

    def add(self, enc: Encoded) -> None:
        self.ids.extend(enc.input_ids)
        self.mask.extend(enc.loss_mask)
        self.lengths.append(len(enc.input_ids))

    def write(self, out: Path, name: str, max_len: int, packing: bool) -> dict[str, Any]:
        lengths = _as_numpy(self.lengths, np.int64)
        mask = _as_numpy(self.mask, np.uint8)
        np.save(out / f"{name}.ids.npy", _as_numpy(self.ids, np.int32))
        np.save(out / f"{name}.mask.npy", mask)
        np.save(out / f"{name}.offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        info: dict[str, Any] = {"rows": len(lengths), "tokens": int(lengths.sum()),
                                "trained_tokens": int(np.count_nonzero(mask))}
        if packing:
            rows = pack(lengths, max_len)
            np.save(out / f"{name}.packs.npy", np.array([i for row in rows for i in row], dtype=np.int64))
            np.save(out / f"{name}.pack_offsets.npy",
                    np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64))
            info |= {"packed_rows": len(rows), "packing_efficiency": round(efficiency(lengths, rows, max_len), 4)}
        return info


def contamination_guard(cfg: Config) -> ContaminationGuard | None:
    return None if cfg.data.contamination == "ignore" else guard_for(cfg.eval.benchmarks)


def dropped_as_contaminated(guard: ContaminationGuard | None, location: str, messages: list[dict[str, str]],
                            policy: str, contaminated: list[dict[str, Any]], rejected: list[Rejection],
                            schema: str = "") -> bool:
    """Check a training record's first user turn against the evaluation questions: an overlap is recorded in
    `contaminated`; with the `drop` policy the record is rejected too and True is returned."""
    if guard is None:
        return False
    user = next(m["content"] for m in messages if m["role"] == "user")
    matches = guard.check(question_stem(user))
    if not matches:
        return False
    contaminated.append({"location": location, "matches": [asdict(m) for m in matches]})
    if policy != "drop":
        return False
    rejected.append(Rejection(location, "overlaps an evaluation question",
                              f"{matches[0].benchmark} {matches[0].item_id}", schema))
    return True


def batches(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def percentiles(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values)
    return {f"p{q}": float(np.percentile(arr, q)) for q in (50, 90, 99)} | {"max": int(arr.max())}


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def finish(out: Path, source: str, dc: DataConfig, splits: dict[str, SplitWriter], rejected: list[Rejection],
           contaminated: list[dict[str, Any]], used: int, packing: bool, what: str = "record") -> dict[str, Any]:
    """What both record kinds end with: data.strict, nothing usable, the splits written, rejected.jsonl and
    contamination.jsonl; returns each split's facts."""
    if dc.strict and rejected:
        shown = "; ".join(str(r) for r in rejected[:3])
        raise MedtuneError(f"{source}: {len(rejected)} record(s) rejected and data.strict is on: {shown}", exit_code=1)
    if not used:
        raise MedtuneError(f"{source}: no usable {what} ({len(rejected)} rejected; see {out / 'rejected.jsonl'})")
    split_info = {name: w.write(out, name, dc.max_len, packing) for name, w in splits.items()}
    write_jsonl(out / "rejected.jsonl", (asdict(r) for r in rejected))
    write_jsonl(out / "contamination.jsonl", contaminated)
    return split_info


def report_head(source: str, kind: str, read: int, used: int, rejected: list[Rejection],
                split_info: dict[str, Any], dc: DataConfig) -> dict[str, Any]:
    """The report's first lines, the same for both record kinds: what was read, used and rejected, the splits."""
    return {"source": source, "record_kind": kind, "records_read": read, "used": used, "rejected": len(rejected),
            "rejected_by_reason": dict(Counter(r.reason for r in rejected).most_common()),
            "train_rows": split_info["train"]["rows"], "val_rows": split_info["val"]["rows"],
            "train_tokens": split_info["train"]["tokens"], "trained_tokens": split_info["train"]["trained_tokens"],
            "splits": split_info, "max_len": dc.max_len, "length_policy": dc.length_policy}


def report_tail(contaminated: list[dict[str, Any]], dc: DataConfig, eot: str, pad: str | None) -> dict[str, Any]:
    """The report's lines on contamination and the chat format, the same for both record kinds."""
    return {"contaminated": len(contaminated), "contamination_policy": dc.contamination, "end_of_turn_token": eot,
            "pad_token": pad, "system_prompt": dc.system_prompt}


def log_contamination(ui: Any, contaminated: list[dict[str, Any]], dc: DataConfig, what: str) -> None:
    if contaminated:
        ui.log(f"[yellow]data: {len(contaminated)} {what} overlap an evaluation question "
               f"({'dropped' if dc.contamination == 'drop' else 'kept'}; see contamination.jsonl)[/]")
