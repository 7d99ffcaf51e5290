"""The eval stage's reports: the Markdown table, the accuracy bar chart, and warnings about training-data overlap.

Overlap is read from the data stage's files of the same run: `prepared/report.json` (`contaminated`: training
records that match an evaluation question, `contamination_policy`) and `prepared/contamination.jsonl` (one line per
such record: {"location", "matches": [{"benchmark", "item_id", "kind", "score"}]}).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from medtune import DISCLAIMER
from medtune.artifacts import atomic_write_bytes, atomic_write_text
from medtune.evaluate.benchmarks import Item
from medtune.evaluate.stats import ALPHA

MODE_LINES = {
    "generate": "zero-shot chain of thought with the model's chat template, greedy, at most {max_new_tokens} new "
                "tokens; the answer letter is extracted from the text",
    "loglik": "log-likelihood of each option's letter after the lm-evaluation-harness prompt (\"...Answer:\"); "
              "the most likely option is the answer",
}


def results_table(summary: dict[str, Any]) -> str:
    lines = ["| model | benchmark | n | accuracy | 95% CI | extraction failures | items/s |",
             "|---|---|---:|---:|---|---:|---:|"]
    for model, benches in summary["models"].items():
        for bench, s in benches.items():
            lines.append(f"| {model} | {bench} | {s['n']} | {s['accuracy']:.1%} | "
                         f"{s['ci95'][0]:.1%}–{s['ci95'][1]:.1%} | {s['extraction_failure_rate']:.1%} | "
                         f"{s['items_per_s'] or '-'} |")
    return "\n".join(lines) + "\n"


def comparison_table(summary: dict[str, Any]) -> str:
    """Models as rows, benchmarks as columns: accuracy and its 95% interval, for comparing base, tuned and quants."""
    benches = list(dict.fromkeys(b for per_model in summary["models"].values() for b in per_model))
    lines = ["| model | " + " | ".join(benches) + " |", "|---|" + "---:|" * len(benches)]
    for model, per_model in summary["models"].items():
        cells = [f"{s['accuracy']:.1%} ({s['ci95'][0]:.1%}–{s['ci95'][1]:.1%}), n={s['n']}" if s else "-"
                 for s in (per_model.get(b) for b in benches)]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired_table(summary: dict[str, Any]) -> str:
    """Each model against the first on the same items: difference, discordant counts, McNemar's exact p-value."""
    lines = [f"Each model against the first on the items both answered: the difference in accuracy, the items only "
             f"one of the two got right, and the two-sided p-value of McNemar's exact test on those items. A "
             f"difference with p >= {ALPHA:g} may be chance; with 5 or fewer such items no split can reach "
             f"p < {ALPHA:g}.\n",
             "| model | vs | benchmark | n | difference | right only for the first | right only for this model | "
             "p (McNemar) | verdict |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for bench, per_model in summary.get("paired", {}).items():
        for model, c in per_model.items():
            if c["significant"]:
                verdict = f"significant (p < {ALPHA:g})"
            elif not c["can_be_significant"]:
                verdict = f"not significant: {c['only_reference'] + c['only_this']} discordant items are too few"
            else:
                verdict = "not significant"
            lines.append(f"| {model} | {c['reference']} | {bench} | {c['n']} | {c['difference']:+.1%} | "
                         f"{c['only_reference']} | {c['only_this']} | {c['p_value']:.3g} | {verdict} |")
    return "\n".join(lines) + "\n"


def overlap(prepared: Path, benches: dict[str, list[Item]]) -> dict[str, dict[str, Any]]:
    """Per benchmark that overlaps the run's training data: {items, evaluated, policy}; {} when nothing does.

    `items` counts the benchmark's items that some training record matches, `evaluated` those of them that were
    evaluated here (a `limit` evaluates a sample). A report that counts overlaps without a readable
    contamination.jsonl gives `items: None` for every benchmark.
    """
    report_path = prepared / "report.json"
    if not report_path.is_file():
        return {}
    report = json.loads(report_path.read_text(encoding="utf-8"))
    if not report.get("contaminated"):
        return {}
    policy = report.get("contamination_policy", "report")
    matched: dict[str, set[str]] = defaultdict(set)
    lines_path = prepared / "contamination.jsonl"
    if not lines_path.is_file():
        return {name: {"items": None, "evaluated": None, "records": report["contaminated"], "policy": policy}
                for name in benches}
    for line in lines_path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            for match in json.loads(line).get("matches", []):
                matched[match["benchmark"]].add(str(match["item_id"]))
    return {name: {"items": len(matched[name]), "evaluated": sum(item.id in matched[name] for item in items),
                   "records": report["contaminated"], "policy": policy}
            for name, items in benches.items() if matched[name]}


def overlap_warnings(found: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for name, o in found.items():
        if o["items"] is None:
            what = f"{o['records']} training record(s) of this run match evaluation questions (see prepared/)"
        else:
            what = (f"{o['items']} of its items ({o['evaluated']} of those evaluated here) match training records "
                    "of this run (prepared/contamination.jsonl)")
        if o["policy"] == "drop":
            lines.append(f"Note: {name}: {what}; those records were dropped from training (data.contamination: "
                         "drop).")
        else:
            lines.append(f"**Warning:** {name}: {what}; they were kept in training, so its scores may be inflated "
                         "(set data.contamination: drop to remove them).")
    return lines


def accuracy_chart(summary: dict[str, Any], path: Path) -> None:
    """Grouped bars: accuracy per benchmark (groups) and model (bars), with 95% Wilson intervals as error bars."""
    import io

    from matplotlib.figure import Figure

    models = list(summary["models"])
    benches = list(dict.fromkeys(b for per_model in summary["models"].values() for b in per_model))
    width = 0.8 / max(1, len(models))
    fig = Figure(figsize=(max(6.0, 1.2 + len(benches) * len(models) * 0.5), 4.5), layout="constrained")
    ax = fig.add_subplot()
    for m, model in enumerate(models):
        xs, acc, low, high = [], [], [], []
        for b, bench in enumerate(benches):
            s = summary["models"][model].get(bench)
            if s is None:
                continue
            xs.append(b - 0.4 + width * (m + 0.5))
            acc.append(s["accuracy"])
            low.append(max(0.0, s["accuracy"] - s["ci95"][0]))
            high.append(max(0.0, s["ci95"][1] - s["accuracy"]))
        ax.bar(xs, acc, width * 0.9, yerr=[low, high], capsize=3, label=model)
    ax.set_xticks(range(len(benches)), benches)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (95% Wilson interval)")
    ax.set_title(f"medtune eval ({summary.get('mode', 'generate')})")
    ax.legend(fontsize="small", ncols=min(4, len(models)))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())


def write_report(out: Path, summary: dict[str, Any], warnings: list[str]) -> str:
    """results.md (mode, overlap warnings, table, chart, disclaimer) and accuracy.png in `out`; returns the text."""
    accuracy_chart(summary, out / "accuracy.png")
    mode = summary.get("mode", "generate")
    parts = [f"# medtune eval\n\nMode: {mode}: {MODE_LINES[mode].format(**summary)}.\n",
             *(f"{w}\n" for w in warnings),
             "## Comparison\n",
             comparison_table(summary),
             *(["## Paired comparison\n", paired_table(summary)] if summary.get("paired") else []),
             "## Details\n",
             results_table(summary),
             "![accuracy per benchmark and model](accuracy.png)\n",
             f"{DISCLAIMER}\n"]
    text = "\n".join(parts)
    atomic_write_text(out / "results.md", text)
    return text
