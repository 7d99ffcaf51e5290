"""The report's export and evaluation sections, read from gguf/manifest.json and eval/ (summary.json, per-item
JSONL). Keys added by newer medtune versions (divergence from F16, the recommended file, the constant-answer
baseline and answer shares) are shown when present and skipped quietly when not."""

from __future__ import annotations

from typing import Any

import medtune.report.svg as svg
from medtune.report.html import Raw, code, facts, join, note, number, percent, section, shown, size, table, tag
from medtune.report.reader import RunFiles, constant_answer, item_folder, pick

ANSWERS_SHOWN = 3  # per model and benchmark: the first items in file order, not chosen by outcome
ANSWER_CHARS = 600


def _leaves(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Numeric leaves of a nested dict as (dotted key, value)."""
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in _leaves(v, f"{prefix}{k}." if prefix or k else "")]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [(prefix.rstrip("."), value)]
    return []


def _divergence(result: dict[str, Any]) -> str | None:
    """Any divergence-from-F16 numbers of a file (KL divergence, top-1 agreement with F16, ...), however keyed."""
    found = [(k, v) for k, v in result.items() if "diverg" in k or k.startswith("kl")]
    leaves = [leaf for k, v in found for leaf in _leaves(v, f"{k}.")]
    return ", ".join(f"{k.split('.', 1)[-1] or k} {number(v, 3)}" for k, v in leaves) or None


def _recommended(results: dict[str, Any]) -> str | None:
    value = results.get("recommended")
    if isinstance(value, dict):
        name = value.get("file") or value.get("type")
        why = value.get("reason") or value.get("why")
        return f"{name}" + (f" — {why}" if why else "") if name else None
    return str(value) if value else None


def _file_row(gguf_type: str, r: dict[str, Any]) -> list[Any]:
    rel = "gguf/manifest.json#"
    where = f"{rel}results/files/{gguf_type}"
    tok, ppl = r.get("tokenizer") or {}, r.get("perplexity") or {}
    top1 = pick(r, "logits", "top1_agreement")
    change = ppl.get("relative_to_float")
    finish = pick(r, "runtime", "finish_reason")
    return [
        tag("code", r.get("file"), class_="file"), gguf_type,
        join([shown(str(tok.get("identical")), f"{where}/tokenizer/identical", tok.get("identical")), "/",
              shown(str(tok.get("texts")), f"{where}/tokenizer/texts", tok.get("texts"))]) if tok else None,
        shown(percent(top1, 2), f"{where}/logits/top1_agreement", top1) if top1 is not None else "–",
        join([shown(f"{ppl['value']:.3f}", f"{where}/perplexity/value", ppl["value"]),
              "" if change is None else f" ({change:+.1%})"]) if "value" in ppl else None,
        _divergence(r) or "–",
        shown("stops" if finish == "stop" else f"no ({finish})", f"{where}/runtime/finish_reason", finish),
        "; ".join(r.get("problems") or []) or "none",
    ]


def export_section(files: RunFiles, folder: str) -> Raw:
    manifest = files.manifest(folder) or {}
    results = manifest.get("results") or {}
    rows = [_file_row(gguf_type, r) for gguf_type, r in (results.get("files") or {}).items()]
    rel = f"{folder}/manifest.json#files"
    listed = [[tag("code", e.get("path"), class_="file"),
               shown(size(e.get("bytes")), f"{rel}/{i}/bytes", e.get("bytes")),
               tag("code", shown(e.get("sha256"), f"{rel}/{i}/sha256", e.get("sha256")), class_="hash")]
              for i, e in enumerate(manifest.get("files", []))]
    recommended = _recommended(results)
    divergence = any(_divergence(r) for r in (results.get("files") or {}).values())
    headers = ["file", "type", "tokenizer parity (identical texts)", "top-1 vs HF", "held-out perplexity (vs float)",
               "divergence from F16", "answer ends its turn", "problems"]
    keep = [i for i, h in enumerate(headers) if divergence or h != "divergence from F16"]
    parts: list[Any] = [
        facts([("llama.cpp (llama-cpp-python)", results.get("llama_cpp_version")),
               ("recommended file", recommended), ("Ollama Modelfile uses", pick(results, "ollama", "from"))]),
        tag("h3", "Checks per file"),
        table([headers[i] for i in keep], ([row[i] for i in keep] for row in rows), [2, 3, 4]),
        tag("h3", "Files of gguf/ (manifest.json)"), table(["file", "size", "sha256"], listed, [1])]
    if not recommended:
        parts.insert(1, note("No recommended file is recorded in this run's manifest (an export before medtune "
                             "measured one)."))
    parts += [note(w, kind="warn") for w in results.get("warnings") or []]
    sample_type = next((t for t in ("Q4_K_M", *(results.get("files") or {})) if t in (results.get("files") or {})),
                       None)
    if sample_type:
        sample = results["files"][sample_type]
        parts.append(tag("details", tag("summary", f"The stop check's answer from {sample.get('file')}"),
                         tag("pre", pick(sample, "runtime", "text") or "")))
    return section("export", "Export", *parts)


def _shares(value: Any) -> str | None:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v:.0%}" if isinstance(v, float) and v <= 1 else f"{k} {v}" for k, v in value.items())
    return None if value is None else str(value)


def _constant(files: RunFiles, rel_dir: str, model: str, bench: str, row: dict[str, Any]) -> tuple[float | None, str]:
    answer, accuracy = constant_answer(files.root / rel_dir, model, bench, row)
    if accuracy is None:
        return None, "–"
    counted = "" if "always_most_common_answer" in row else " (from the keys)"
    return accuracy, f"{answer + ': ' if answer else ''}{accuracy:.1%}{counted}"


def _eval_rows(files: RunFiles, rel_dir: str,
               summary: dict[str, Any]) -> tuple[list[list[Any]], list[svg.Bar], dict[str, float]]:
    rel = f"{rel_dir}/summary.json"
    rows, bars, baselines = [], [], {}
    for model, per_model in (summary.get("models") or {}).items():
        for bench, s in per_model.items():
            where = f"{rel}#models/{model}/{bench}"
            low, high = (s.get("ci95") or [None, None])[:2]
            acc, base_text = _constant(files, rel_dir, model, bench, s)
            if acc is not None:
                baselines.setdefault(bench, acc)
            p_const = s.get("mcnemar_p_vs_constant")
            rows.append([bench, model, shown(number(s.get("n")), f"{where}/n", s.get("n")),
                         shown(percent(s.get("accuracy")), f"{where}/accuracy", s.get("accuracy")),
                         join([shown(percent(low), f"{where}/ci95/0", low), "–",
                               shown(percent(high), f"{where}/ci95/1", high)]) if low is not None else None,
                         shown(percent(s.get("extraction_failure_rate")), f"{where}/extraction_failure_rate",
                               s.get("extraction_failure_rate")) if "extraction_failure_rate" in s else "–",
                         base_text, number(p_const, 3) or "–", number(s.get("rstd"), 3) or "–",
                         _shares(s.get("answer_shares")) or "–", _shares(s.get("gold_shares")) or "–",
                         s.get("formulation") or "–"])
            if s.get("accuracy") is not None:
                bars.append(svg.Bar(bench, model, s["accuracy"], low, high))
    return rows, bars, baselines


def _paired(summary: dict[str, Any]) -> Raw | None:
    rows = [[bench, model, c.get("reference"), number(c.get("n")), f"{c.get('difference', 0):+.1%}",
             c.get("only_reference"), c.get("only_this"), number(c.get("p_value"), 3),
             "significant" if c.get("significant") else "not significant"]
            for bench, per_model in (summary.get("paired") or {}).items() for model, c in per_model.items()]
    if not rows:
        return None
    return join([tag("h3", "Paired tests (each model against the first, same items)"),
                 table(["benchmark", "model", "vs", "n", "difference", "right only for the first",
                        "right only for this model", "p (McNemar exact)", "verdict"], rows, [3, 4, 5, 6, 7])])


def _answers(files: RunFiles, rel_dir: str, summary: dict[str, Any]) -> Raw | None:
    blocks = []
    for model, per_model in (summary.get("models") or {}).items():
        folder = item_folder(files.root / rel_dir, model)
        for bench in per_model:
            rel = f"{rel_dir}/{folder.name if folder else model}/{bench}.jsonl"
            items = files.jsonl(rel, limit=ANSWERS_SHOWN) if folder else None
            if not items:
                continue
            rows = [[code(i.get("id")), tag("pre", str(i.get("output", ""))[:ANSWER_CHARS]),
                     shown(i.get("extracted") or "none", f"{rel}:{n + 1}#extracted", i.get("extracted")),
                     shown(i.get("gold"), f"{rel}:{n + 1}#gold", i.get("gold")),
                     "right" if i.get("correct") else "wrong"] for n, i in enumerate(items)]
            blocks.append(tag("details", tag("summary", f"{model} on {bench}: the first {len(rows)} answers"),
                              table(["item", "answer (start)", "extracted", "key", ""], rows),
                              open="open" if not blocks else None))
    return join([tag("h3", "A few answers (the first items of each file)"), *blocks]) if blocks else None


def eval_block(files: RunFiles, rel_dir: str, title: str, required: bool = True) -> Raw | None:
    rel = f"{rel_dir}/summary.json"
    summary = files.json(rel, required)
    if summary is None:
        return None
    rows, bars, baselines = _eval_rows(files, rel_dir, summary)
    headers = ["benchmark", "model", "n", "accuracy", "95% interval", "no letter found",
               "always the most common answer", "p vs constant", "rstd", "answer shares", "key shares", "formulation"]
    # the columns a newer summary adds are shown when some row has them
    keep = [i for i, h in enumerate(headers) if i < 7 or any(row[i] != "–" for row in rows)]
    numeric = [i for i, h in enumerate(headers) if i in (2, 3, 5, 7, 8)]
    parts: list[Any] = [tag("h3", title), table([headers[i] for i in keep], ([row[i] for i in keep] for row in rows),
                                                [keep.index(i) for i in numeric if i in keep])]
    chart = svg.grouped_bars(f"Accuracy with 95% interval ({summary.get('mode', 'generate')})", bars,
                             "accuracy", baselines, "always the most common answer")
    parts += [tag("div", chart, class_="charts") if chart else "", _paired(summary) or ""]
    for bench, o in (summary.get("overlap") or {}).items():
        fate = ("those records were dropped from training" if o.get("policy") == "drop" else
                "those records were kept in training, so its scores may be inflated")
        parts.append(note(f"{bench}: {o.get('items')} item(s) match training records of this run; {fate}.",
                          kind="warn"))
    parts.append(_answers(files, rel_dir, summary) or "")
    return join(parts)


def eval_section(files: RunFiles, folder: str) -> Raw:
    blocks = [eval_block(files, folder, "Generated answers, letter extracted"),
              eval_block(files, f"{folder}/loglik", "Log-likelihood of the options", required=False)]
    if blocks[0] is None:
        return section("evaluation", "Evaluation", note(f"{folder}/summary.json is missing."))
    return section("evaluation", "Evaluation", *[b for b in blocks if b])
