"""The eval stage's reports: the Markdown tables, the accuracy chart, and warnings about training-data overlap.

Every report shows, per benchmark, the score of always giving the keys' most common answer and the keys' shares, and
per model and formulation the answer shares, RStd and McNemar's p against the first model and that constant answer:
a score is knowledge only where it beats what a letter habit gets.

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
from medtune.evaluate.stats import ALPHA
from medtune.formats.choice import Item

MODE_LINES = {
    "generate": "zero-shot chain of thought with the model's chat template, greedy, at most {max_new_tokens} new "
                "tokens; the answer letter is extracted from the text",
    "loglik": "log-likelihood of each option's letter after the lm-evaluation-harness prompt (\"...Answer:\"); "
              "the most likely option is the answer (loglik-pride: the letter prior estimated on a calibration "
              "subset and removed)",
    "cloze": "log-likelihood of each option's text after \"Question: ...\\nAnswer:\" (no letters shown, as "
             "lm-evaluation-harness and OLMES score small models); cloze: the highest summed log-likelihood (acc), "
             "cloze-norm: the highest per character of the option (acc_norm); the comparison shows cloze-norm",
}
CIRCULAR_LINE = ("Circular: every item was also asked under each circular shift of its options; *-circular counts "
                 "it right only if right under all shifts (always giving one letter scores 0 there).")


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
        # with the answer shares and RStd where the summary has them, so a letter habit shows beside the score
        cells = [f"{cell}; answers {_shares(s['answer_shares'])}, RStd {s['rstd']:.0f}" if s and "rstd" in s else cell
                 for cell, s in zip(cells, (per_model.get(b) for b in benches))]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    constant = summary.get("always_most_common_answer")
    if constant:
        lines.append("| always the most common answer | " + " | ".join(
            f"{constant[b]['accuracy']:.1%} (\"{constant[b]['answer']}\")" if b in constant else "-" for b in benches)
            + " |")
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


def _shares(shares: dict[str, float]) -> str:
    return " ".join(f"{key} {share:.0%}" for key, share in shares.items() if share or key != "none")


def benchmarks_table(summary: dict[str, Any]) -> str:
    """Per benchmark: the keys' shares, the score of always giving the most common answer, what does not apply."""
    lines = ["| benchmark | n | keys' shares | always the most common answer | not applicable |",
             "|---|---:|---|---:|---|"]
    for bench, facts in summary.get("benchmarks", {}).items():
        constant = facts["always_most_common_answer"]
        skipped = ", ".join(f"{name}: {why}" for name, why in facts["not_applicable"].items()) or "-"
        lines.append(f"| {bench} | {facts['n']} | {_shares(facts['gold_shares'])} | "
                     f"{constant['accuracy']:.1%} (\"{constant['answer']}\") | {skipped} |")
    return "\n".join(lines) + "\n"


def _notes(row: dict[str, Any]) -> str:
    if "consistency" in row:
        return f"mean over shifts {row['mean_accuracy']:.1%}, consistency {row['consistency']:.1%}"
    if "prior" in row:
        prior = " ".join(f"{k} {v:.0%}" for k, v in row["prior"].items())
        return f"{row['n_calibration']} calibration items left out (below); letter prior {prior}"
    return ""


def formulations_table(summary: dict[str, Any]) -> str:
    """One row per model, benchmark and formulation: accuracy, answer shares, RStd, the two McNemar p-values."""
    lines = ["| model | benchmark | formulation | n | accuracy (95% CI) | always the most common answer | answer "
             "shares | RStd | p vs first | p vs constant | macro-F1 | notes |",
             "|---|---|---|---:|---|---:|---|---:|---:|---:|---:|---|"]
    for row in summary.get("rows", []):
        first = "-" if row.get("mcnemar_p_vs_first") is None else f"{row['mcnemar_p_vs_first']:.3g}"
        f1 = "-" if row["macro_f1"] is None else f"{row['macro_f1']:.3f}"
        lines.append(f"| {row['model']} | {row['benchmark']} | {row['formulation']} | {row['n']} | "
                     f"{row['accuracy']:.1%} ({row['ci95'][0]:.1%}–{row['ci95'][1]:.1%}) | "
                     f"{row['constant_accuracy']:.1%} | {_shares(row['answer_shares'])} | {row['rstd']:.1f} | "
                     f"{first} | {row['mcnemar_p_vs_constant']:.3g} | {f1} | {_notes(row)} |")
    for bench, facts in summary.get("benchmarks", {}).items():
        for name, why in facts["not_applicable"].items():
            lines.append(f"| all | {bench} | {name} | - | {why} | | | | | | | |")
    return "\n".join(lines) + "\n"


def calibration_note(summary: dict[str, Any]) -> list[str]:
    """The PriDe calibration items by id, per benchmark (they are not counted in loglik-pride)."""
    return [f"PriDe calibration items of {bench} ({len(facts['calibration_ids'])}, 5% stratified by gold letter, "
            f"seeded; scored under every cyclic permutation, not counted in loglik-pride): "
            + ", ".join(facts["calibration_ids"]) + "\n"
            for bench, facts in summary.get("benchmarks", {}).items() if facts.get("calibration_ids")]


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


def _bars(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """What the chart shows: every row (model and formulation), or for an older summary each model's result."""
    if summary.get("rows"):
        return summary["rows"]
    return [{"model": model, "benchmark": bench, **s} for model, per_model in summary["models"].items()
            for bench, s in per_model.items()]


def _accuracy_axis(ax: Any, summary: dict[str, Any], benches: list[str]) -> None:
    """Grouped bars with 95% Wilson intervals and RStd above each bar; a dashed line: always the most common answer."""
    rows = _bars(summary)
    series = list(dict.fromkeys((r["model"], r.get("formulation", "")) for r in rows))
    width = 0.8 / max(1, len(series))
    for m, (model, formulation) in enumerate(series):
        mine = {r["benchmark"]: r for r in rows if (r["model"], r.get("formulation", "")) == (model, formulation)}
        xs = [b - 0.4 + width * (m + 0.5) for b, bench in enumerate(benches) if bench in mine]
        acc = [mine[bench]["accuracy"] for bench in benches if bench in mine]
        err = [[max(0.0, mine[b]["accuracy"] - mine[b]["ci95"][0]) for b in benches if b in mine],
               [max(0.0, mine[b]["ci95"][1] - mine[b]["accuracy"]) for b in benches if b in mine]]
        ax.bar(xs, acc, width * 0.9, yerr=err, capsize=3, label=f"{model} {formulation}".strip())
        for x, bench in zip(xs, [b for b in benches if b in mine]):
            if "rstd" in mine[bench]:
                ax.annotate(f"{mine[bench]['rstd']:.0f}", (x, 0.01), ha="center", fontsize="x-small")
    for b, bench in enumerate(benches):
        constant = summary.get("always_most_common_answer", {}).get(bench)
        if constant:
            ax.hlines(constant["accuracy"], b - 0.45, b + 0.45, colors="black", linestyles="dashed",
                      label="always the most common answer" if b == 0 else None)
    ax.set_xticks(range(len(benches)), benches)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (95% Wilson interval);\nat the foot of each bar: RStd")
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, not on them


def _shares_axis(ax: Any, summary: dict[str, Any], benches: list[str]) -> None:
    """Stacked bars: the keys' shares, then each model's answer shares (first formulation), per benchmark."""
    labels, stacks = [], []
    for bench in benches:
        labels.append(f"{bench}\nkeys")
        stacks.append(summary["benchmarks"][bench]["gold_shares"])
        for model in summary["models"]:
            row = summary["models"][model].get(bench)
            if row and "answer_shares" in row:
                labels.append(f"{bench}\n{model}")
                stacks.append(row["answer_shares"])
    names = list(dict.fromkeys(name for stack in stacks for name in stack))
    bottom = [0.0] * len(stacks)
    for name in names:
        heights = [stack.get(name, 0.0) for stack in stacks]
        ax.bar(range(len(stacks)), heights, 0.7, bottom=bottom, label=name)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xticks(range(len(stacks)), labels, fontsize="x-small", rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of answers")
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.0, 1.0))


def accuracy_chart(summary: dict[str, Any], path: Path) -> None:
    """Accuracy per benchmark, model and formulation against the constant answer; below, the answer shares."""
    import io

    from matplotlib.figure import Figure

    benches = list(dict.fromkeys(b for per_model in summary["models"].values() for b in per_model))
    with_shares = bool(summary.get("benchmarks"))
    n_bars = len(_bars(summary))
    fig = Figure(figsize=(max(6.0, 1.2 + n_bars * 0.5), 8.5 if with_shares else 4.5), layout="constrained")
    axes = fig.subplots(2, 1) if with_shares else [fig.add_subplot()]
    _accuracy_axis(axes[0], summary, benches)
    axes[0].set_title(f"medtune eval ({summary.get('mode', 'generate')})")
    if with_shares:
        _shares_axis(axes[1], summary, benches)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())


def write_report(out: Path, summary: dict[str, Any], warnings: list[str]) -> str:
    """results.md (mode, overlap warnings, table, chart, disclaimer) and accuracy.png in `out`; returns the text."""
    accuracy_chart(summary, out / "accuracy.png")
    mode = summary.get("mode", "generate")
    parts = [f"# medtune eval\n\nMode: {mode}: {MODE_LINES[mode].format(**summary)}.\n",
             *([CIRCULAR_LINE + "\n"] if summary.get("circular") else []),
             *(f"{w}\n" for w in warnings),
             "## Comparison\n",
             comparison_table(summary),
             *(["## Against a letter habit\n", benchmarks_table(summary), formulations_table(summary),
                *calibration_note(summary)] if summary.get("rows") else []),
             *(["## Paired comparison\n", paired_table(summary)] if summary.get("paired") else []),
             "## Details\n",
             results_table(summary),
             "![accuracy per benchmark and model](accuracy.png)\n",
             f"{DISCLAIMER}\n"]
    text = "\n".join(parts)
    atomic_write_text(out / "results.md", text)
    return text
