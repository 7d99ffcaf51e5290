"""The end-of-run summary: every artifact with its path and size, a sample answer, the eval table."""

from __future__ import annotations

import json
from typing import Any

from medtune import DISCLAIMER
from medtune.artifacts import RunDir
from medtune.config import Config
from medtune.pipeline import active_stages
from medtune.report.html import size


def _print_files(results: dict[str, Any], console: Any) -> None:
    """Each GGUF file's divergence from F16 and the tuning it keeps, fallbacks, and the file to use."""
    from rich.table import Table

    if "divergence" not in results:  # an export from before these checks
        return
    div = results["divergence"]
    table = Table(title=f"GGUF files vs {div['reference']} on {div['text']} ({div['positions']} positions)")
    for column in ("file", "size", "mean KLD", "p99 KLD", "same top", "ppl diff", "tuning kept", "stops", "note"):
        table.add_column(column, justify="left" if column in ("file", "note") else "right")
    for r in results["files"].values():
        d = r.get("divergence") or {}
        fell = r.get("fallback") or {}
        note = (f"{fell['fallback']} of {fell['matrices']} matrices " + "/".join(fell["fallback_types"])
                if fell.get("most") else "")
        note += " imatrix" if r.get("imatrix") else ""
        table.add_row(r["file"], size(r["bytes"]), *(
            "-" if d.get(k) is None else f"{d[k]:{fmt}}" for k, fmt in (
                ("mean_kld", ".4f"), ("p99_kld", ".4f"), ("same_top", ".1%"), ("ppl_diff", "+.3f"),
                ("retention", ".1%"))), "yes" if r.get("stops", True) else "NO", note.strip())
    console.print(table)
    recommended = results.get("recommended") or {}
    if recommended.get("file"):
        console.print(f"[bold]Use {recommended['file']}[/]: {recommended['why']}", highlight=False)
    for gguf_type, reason in (recommended.get("rejected") or {}).items():
        console.print(f"  not {results['files'][gguf_type]['file']}: {reason}", highlight=False, markup=False)
    imatrix = results.get("imatrix") or {}
    if imatrix and not imatrix.get("used") and imatrix.get("setting") != "off":
        console.print(f"  no importance matrix: {imatrix.get('reason')}", highlight=False, markup=False)


def print_summary(cfg: Config, run_dir: RunDir, console: Any) -> None:
    from rich.table import Table

    table = Table(title=f"run {cfg.name}: {run_dir.root}", show_lines=False)
    table.add_column("stage")
    table.add_column("artifact")
    table.add_column("size", justify="right")
    for stage in active_stages(cfg):
        manifest = run_dir.manifest(stage.folder)
        if manifest is None:
            table.add_row(stage.name, "(not run)", "")
            continue
        for entry in manifest["files"]:
            table.add_row(stage.name, str(run_dir / stage.folder / entry["path"]), size(entry["bytes"]))
    console.print(table)

    export = run_dir.manifest("gguf")
    if export:
        files = export["results"]["files"]
        recommended = export["results"].get("recommended") or {}
        sample_type = recommended.get("type") or ("Q4_K_M" if "Q4_K_M" in files else next(iter(files)))
        _print_files(export["results"], console)
        sample = files[sample_type]
        console.print(f"\n[bold]Sample answer from {sample['file']}[/] to: {cfg.export.check_prompt!r}")
        console.print(sample["runtime"]["text"].strip(), markup=False, highlight=False)
    evaluation = run_dir.manifest("eval")
    if evaluation:
        console.print(f"\n[bold]Evaluation[/] ({run_dir / 'eval' / 'results.md'})")
        from medtune.evaluate.report import comparison_table

        summary = json.loads((run_dir / "eval" / "summary.json").read_text(encoding="utf-8"))
        console.print(comparison_table(summary), markup=False, highlight=False)
        if summary.get("mode", "generate") == "generate":
            console.print("answers without an extractable letter: " + ", ".join(
                f"{model} {s['extraction_failure_rate']:.0%} ({bench})"
                for model, per_model in summary["models"].items() for bench, s in per_model.items()), highlight=False)
        loglik = run_dir / "eval" / "loglik"
        if (loglik / "summary.json").is_file():
            console.print(f"\n[bold]Evaluation, log-likelihood of the options[/] ({loglik / 'results.md'})")
            console.print(comparison_table(json.loads((loglik / "summary.json").read_text(encoding="utf-8"))),
                          markup=False, highlight=False)
    console.print(f"\n[dim italic]{DISCLAIMER}[/]")
