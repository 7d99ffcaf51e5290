"""The report's data, training and merge sections, read from prepared/, adapter/ and merged/."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import medtune.report.svg as svg
from medtune.report.html import Raw, code, facts, join, note, number, percent, section, shown, table, tag
from medtune.report.reader import RunFiles, pick

REJECTION_EXAMPLES = 3  # first locations shown per rejection reason
REJECTED_LINES_READ = 100_000  # enough to find the first locations of every reason in a large data set
HISTOGRAM_BINS = 24
CONTAMINATION_SHOWN = 5


def _count(rel: str, data: dict[str, Any], key: str, label: str) -> tuple[str, Raw] | None:
    value = data.get(key)
    return None if value is None else (label, shown(number(value), f"{rel}#{key}", value))


def data_section(files: RunFiles, folder: str) -> Raw:
    rel = f"{folder}/report.json"
    report = files.json(rel)
    if report is None:
        return section("data", "Data", note(f"{rel} is missing: the data stage's numbers can't be shown."))
    counts = [_count(rel, report, k, label) for k, label in (
        ("records_read", "records read"), ("used", "used"), ("rejected", "rejected"),
        ("train_rows", "training rows"), ("val_rows", "validation rows"), ("train_tokens", "training tokens"),
        ("trained_tokens", "tokens with loss"), ("contaminated", "overlapping an evaluation question"))]
    parts: list[Raw] = [
        facts([("source", code(Path(str(report.get("source", ""))).name) if report.get("source") else None),
               ("record kind", report.get("record_kind")), *[c for c in counts if c]]),
        _rejections(files, folder, report), _lengths(files, folder, report), _contamination(files, folder, report),
        *_letter_shares(rel, report), _other_numbers(report)]
    return section("data", "Data", *[p for p in parts if p])


def _rejections(files: RunFiles, folder: str, report: dict[str, Any]) -> Raw | None:
    reasons = report.get("rejected_by_reason") or {}
    if not reasons:
        return note("No record was rejected.") if report.get("rejected") == 0 else None
    first: dict[str, list[str]] = defaultdict(list)
    for record in files.jsonl(f"{folder}/rejected.jsonl", limit=REJECTED_LINES_READ) or []:
        if len(first[record.get("reason", "")]) < REJECTION_EXAMPLES:
            first[record.get("reason", "")].append(str(record.get("location", "")))
    rows = [(reason, shown(number(n), f"{folder}/report.json#rejected_by_reason/{reason}", n),
             join(part for i, loc in enumerate(first.get(reason, [])) for part in ([", "] if i else []) + [code(loc)]))
            for reason, n in reasons.items()]
    return join([tag("h3", "Rejected records by reason"), table(["reason", "records", "first locations"], rows, [1])])


def _histogram(files: RunFiles, folder: str, max_len: int | None) -> Raw | None:
    """Lengths as stored (after the length policy), from the example offsets of both splits."""
    import numpy as np

    lengths = []
    for split in ("train", "val"):
        path = files.root / folder / f"{split}.offsets.npy"
        if path.is_file():
            lengths.append(np.diff(np.load(path)))
    if not lengths or not sum(len(x) for x in lengths):
        return None
    values = np.concatenate(lengths)
    counts, edges = np.histogram(values, bins=HISTOGRAM_BINS, range=(0, max(int(values.max()), max_len or 0)))
    return svg.histogram("Conversation length in tokens, as trained (after the length policy)", edges.tolist(),
                         counts.tolist(), "tokens", "conversations",
                         marker=(max_len, f"max_len {max_len}") if max_len else None)


def _lengths(files: RunFiles, folder: str, report: dict[str, Any]) -> Raw:
    rel = f"{folder}/report.json"
    lengths = report.get("lengths") or {}
    over = report.get("over_max_len")
    policy = report.get("length_policy")
    rows = [(k, shown(number(v), f"{rel}#lengths/{k}", v)) for k, v in lengths.items()]
    shares = [
        _count(rel, report, "over_max_len", f"longer than max_len ({report.get('max_len')})"),
        ("share over max_len", shown(percent(report.get("share_over_max_len")), f"{rel}#share_over_max_len",
                                     report.get("share_over_max_len"))) if "share_over_max_len" in report else None,
        ("length policy", code(policy) if policy else None),
        _count(rel, report, "truncated", "truncated"),
        _count(rel, report, "truncated_answer_cut", "truncated with their final answer cut off"),
        _count(rel, report, "shortened_keep_answer", "shortened keeping the answer"),
    ]
    return join([tag("h3", "Lengths and truncation"),
                 table(["length percentile (tokens, before the policy)", "tokens"], rows, [1]) if rows else "",
                 facts([s for s in shares if s]), tag("div", _histogram(files, folder, report.get("max_len")) or "",
                                                      class_="charts"),
                 note(f"{over} conversation(s) were over the cap.") if over and not policy else ""])


def _contamination(files: RunFiles, folder: str, report: dict[str, Any]) -> Raw | None:
    if not report.get("contaminated"):
        policy = report.get("contamination_policy")
        return note("No training record matches an evaluation question." if policy not in (None, "ignore")
                    else "Training records were not checked against the evaluation questions.")
    lines = files.jsonl(f"{folder}/contamination.jsonl", limit=CONTAMINATION_SHOWN) or []
    rows = [(code(r.get("location")), ", ".join(f"{m.get('benchmark')} {m.get('item_id')} ({m.get('kind')})"
                                                for m in r.get("matches", []))) for r in lines]
    verb = "dropped" if report.get("contamination_policy") == "drop" else "kept in training"
    return join([tag("h3", "Overlap with the evaluation questions"),
                 note(f"{report['contaminated']} training record(s) match an evaluation question; {verb}. "
                      f"The first {len(rows)}:", kind="warn"),
                 table(["training record", "matches"], rows)])


def _letter_shares(rel: str, report: dict[str, Any]) -> list[Raw]:
    """Shares of the gold answer letters, under whatever key the data stage writes them (none in older runs)."""
    out = []
    for key, value in report.items():
        if not isinstance(value, dict) or not any(w in key for w in ("gold", "letter", "answer_share")):
            continue
        flat = {k: v for k, v in value.items() if isinstance(v, (int, float))}
        nested = {k: v for k, v in value.items() if isinstance(v, dict)}
        groups = ({"": flat} if flat else {}) | nested
        for group, shares in groups.items():
            where = f"{rel}#{key}" + (f"/{group}" if group else "")
            rows = [(letter, shown(percent(v) if isinstance(v, float) and v <= 1 else number(v), f"{where}/{letter}",
                                   v)) for letter, v in shares.items() if isinstance(v, (int, float))]
            out.append(join([tag("h3", f"{key.replace('_', ' ')}{' · ' + group if group else ''}"),
                             table(["answer", "share"], rows, [1])]))
    return out


SHOWN_KEYS = {"source", "record_kind", "records_read", "used", "rejected", "train_rows", "val_rows", "train_tokens",
              "trained_tokens", "contaminated", "rejected_by_reason", "lengths", "over_max_len", "share_over_max_len",
              "length_policy", "truncated", "truncated_answer_cut", "shortened_keep_answer", "contamination_policy",
              "max_len"}


def _other_numbers(report: dict[str, Any]) -> Raw | None:
    """The report's other plain values (tokens, packing, newer keys), so nothing it records is hidden."""
    rest = [(k.replace("_", " "), number(v)) for k, v in report.items()
            if k not in SHOWN_KEYS and isinstance(v, (int, float, str, bool)) and not isinstance(v, dict)]
    for split, info in (report.get("splits") or {}).items():
        rest += [(f"{split} {k.replace('_', ' ')}", number(v)) for k, v in info.items()
                 if k not in ("rows", "tokens", "trained_tokens")]
    return join([tag("h3", "Other numbers"), facts(rest)]) if rest else None


TRAIN_FACTS = (("objective", "objective"), ("device", "device"), ("precision", "precision"),
               ("world_size", "processes"), ("strategy", "strategy"), ("steps", "optimizer steps"),
               ("trainable_params", "trainable parameters"), ("train_rows", "training rows"), ("packed", "packed"),
               ("final_loss", "final loss"), ("val_loss_before", "validation loss before"),
               ("val_loss_after", "validation loss after"), ("tokens_per_s", "tokens/s"),
               ("elapsed_s", "training seconds"), ("peak_gpu_memory_gib", "peak GPU memory (GiB)"),
               ("threads", "CPU threads"), ("resumed_from_step", "resumed from step"))

CHARTS = (  # (title, y axis, metric keys, y range)
    ("Learning rate", "lr", ("lr",), None),
    ("Gradient norm (before clipping)", "norm", ("grad_norm",), None),
    ("Throughput", "tokens/s", ("tokens_per_s",), None),
    ("DPO/ORPO rewards", "reward", ("rewards/chosen", "rewards/rejected"), None),
    ("Reward margin (chosen − rejected)", "margin", ("rewards/margins",), None),
    ("Share of pairs whose chosen reply is preferred", "share", ("rewards/accuracies",), (0.0, 1.0)),
    ("Log-probabilities", "log p", ("logps/chosen", "logps/rejected"), None),
    ("NLL of the chosen reply / ORPO log odds", "value", ("nll", "log_odds_ratio"), None),
)


def _series(metrics: list[dict[str, Any]], key: str, dots: bool = False) -> svg.Series:
    return svg.Series(key, [(m["step"], m[key]) for m in metrics
                            if isinstance(m.get(key), (int, float)) and "step" in m], dots)


def train_charts(metrics: list[dict[str, Any]]) -> list[Raw]:
    charts = [svg.lines("Loss", [_series(metrics, "loss"), svg.Series("validation loss", _series(
        metrics, "val_loss").points, dots=True)], "optimizer step", "loss")]
    memory = sorted({k for m in metrics for k in m if "mem" in k and isinstance(m[k], (int, float))})
    for title, y_title, keys, y_range in (*CHARTS, ("Peak memory", "GiB", tuple(memory), None)):
        charts.append(svg.lines(title, [_series(metrics, k) for k in keys], "optimizer step", y_title, y_range))
    return [c for c in charts if c]


def train_section(files: RunFiles, folder: str) -> Raw:
    report = files.json(f"{folder}/train_report.json") or {}
    metrics = files.jsonl(f"{folder}/metrics.jsonl")
    rel = f"{folder}/train_report.json"
    parts: list[Any] = [facts((label, shown(number(report.get(k)), f"{rel}#{k}", report.get(k)))
                              for k, label in TRAIN_FACTS if report.get(k) is not None)]
    if report and report.get("peak_gpu_memory_gib") is None:
        parts.append(note("Peak GPU memory: not measured (trained on a CPU)."))
    if metrics:
        parts += [tag("div", *train_charts(metrics), class_="charts")]
        if not any("mem" in k for m in metrics for k in m):
            parts.append(note("Memory per step is not in metrics.jsonl; the run's peak is above."))
    else:
        parts.append(note(f"{folder}/metrics.jsonl is missing: no curves."))
    parts.append(_checkpoints(files, folder, report))
    return section("training", "Training", *parts)


def _checkpoints(files: RunFiles, folder: str, report: dict[str, Any]) -> Raw:
    config = pick(files.manifest(folder), "config", "train") or {}
    kept = sorted(p.name for p in (files.root / "checkpoints").glob("*/step-*"))
    resumed = report.get("resumed_from_step")
    events = []
    if config.get("checkpoint_steps"):
        events.append(f"a checkpoint every {config['checkpoint_steps']} steps, the newest "
                      f"{config.get('keep_checkpoints')} kept")
    events.append(f"resumed from the checkpoint of step {resumed}" if resumed else "trained from the start "
                  "(no checkpoint resumed)" if resumed == 0 else "resume not recorded")
    events.append(("checkpoints on disk: " + ", ".join(kept)) if kept else "no checkpoint left on disk")
    return join([tag("h3", "Checkpoints and resume"), tag("ul", *(tag("li", e) for e in events))])


def merge_section(files: RunFiles, folder: str) -> Raw:
    results = pick(files.manifest(folder), "results") or {}
    rel = f"{folder}/manifest.json#results"
    diff, tolerance = results.get("max_logit_diff"), results.get("tolerance")
    verdict = None if diff is None or tolerance is None else ("within" if diff <= tolerance else "ABOVE")
    return section("merge", "Merge", facts([
        ("dtype", results.get("dtype")), ("QLoRA", results.get("qlora")),
        ("max |logit difference| merged vs base + adapter", shown(number(diff), f"{rel}/max_logit_diff", diff)),
        ("tolerance", shown(number(tolerance), f"{rel}/tolerance", tolerance)), ("check", verdict and f"{verdict} "
                                                                                 "tolerance"),
        ("adapter's own max logit change", number(results.get("adapter_max_logit_change"))),
        ("check prompts", results.get("check_prompts"))]))
