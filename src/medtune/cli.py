"""The `medtune` command line: parsing and printing only; the work is done by the stage modules.

Heavy libraries (torch, transformers, llama_cpp) are imported inside the commands, so `medtune --help` is quick.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from medtune import DISCLAIMER, __version__
from medtune.errors import MedtuneError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help=f"Turn a small open chat model into a local medical reasoning model.\n\n{DISCLAIMER}")
console = Console()
err_console = Console(stderr=True)

ConfigArg = Annotated[Path, typer.Argument(help="Run config (YAML), e.g. configs/demo.yaml")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a config value: section.key=value")]


def _quiet_libraries() -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notes are not for our users
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _fail(exc: MedtuneError) -> None:
    err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(exc.exit_code)


def _run_stages(config: Path, overrides: list[str] | None, names: list[str], force: bool) -> None:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from medtune.artifacts import RunDir
    from medtune.config import load_config
    from medtune.pipeline import BY_NAME, run_all, run_stage
    from medtune.ui import UI

    _quiet_libraries()
    try:
        cfg = load_config(config, overrides)
        run_dir = RunDir(cfg.run_dir)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("eta"), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=False) as progress:
            ui = UI(console, progress)
            if names:
                for name in names:
                    ui.log(f"[bold]{name}[/]: running")
                    run_stage(BY_NAME[name], cfg, run_dir, ui)
            else:
                run_all(cfg, run_dir, ui, force=force)
        from medtune.summary import print_summary

        print_summary(cfg, run_dir, console)
    except MedtuneError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted: finished stages are kept; run the same command to go on[/]")
        raise typer.Exit(130) from None


def _stage_command(name: str, doc: str):
    def command(config: ConfigArg, set_: SetOpt = None) -> None:
        _run_stages(config, set_, [name], force=True)

    command.__doc__ = doc
    app.command(name)(command)


@app.command("data")
def data_command(
    target: Annotated[str, typer.Argument(help="A run config (YAML) to prepare, or `check` to validate a file")],
    path: Annotated[Path | None, typer.Argument(help="With `check`: the data file to validate")] = None,
    set_: SetOpt = None,
    schema: Annotated[str, typer.Option(help="Record schema: auto, reasonmed, conversations, messages, "
                                             "sharegpt, medical_o1")] = "auto",
    strict: Annotated[bool, typer.Option(help="Prepare: fail on any rejected record instead of skipping it")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Check: print the report as JSON")] = False,
) -> None:
    """Prepare a config's training data (write prepared/ and a report), or `data check PATH` to validate a file.

    `data check` exits 0 when every record is usable, 1 when some are rejected, 2 when the file can't be read.
    """
    if target != "check":
        overrides = [*(set_ or []), *(["data.strict=true"] if strict else [])]
        _run_stages(Path(target), overrides, ["data"], force=True)
        return
    from medtune.data.check import check_file, format_report

    try:
        if path is None:
            raise MedtuneError("medtune data check PATH: give the data file to check")
        report = check_file(path, schema)
    except MedtuneError as exc:
        _fail(exc)
    if as_json:
        import json

        typer.echo(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        typer.echo(format_report(report))
    raise typer.Exit(0 if report["rejected"] == 0 else 1)


_stage_command("train", "Train the LoRA adapter on prepared/; write adapter/ with per-step metrics.")
_stage_command("merge", "Merge the adapter into the base; write merged/ (safetensors, tokenizer, template).")
_stage_command("export", "Convert merged/ to GGUF F16 and quantize; verify every file; write gguf/.")
_stage_command("eval", "Evaluate the configured models on the configured multiple-choice benchmarks.")


@app.command("run")
def run_command(config: ConfigArg, set_: SetOpt = None,
                force: Annotated[bool, typer.Option(help="Run every stage even if up to date")] = False) -> None:
    """Run the whole chain; stages whose inputs and config did not change are skipped."""
    _run_stages(config, set_, [], force=force)


@app.command("chat")
def chat_command(
    model: Annotated[Path, typer.Option("-m", "--model", help="A .gguf file or an HF model/adapter directory")],
    prompt: Annotated[str | None, typer.Option("-p", "--prompt", help="Answer this once and exit")] = None,
    system: Annotated[str | None, typer.Option("--system", help="System prompt")] = None,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.7,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.9,
    max_tokens: Annotated[int, typer.Option(min=1)] = 1024,
    n_ctx: Annotated[int, typer.Option(help="Context size for GGUF models")] = 4096,
) -> None:
    """Chat with a model: one-shot with -p, interactive without."""
    _quiet_libraries()
    from medtune.infer.chat import answer, disclaimer_banner, interactive
    from medtune.infer.engines import open_engine

    err_console.print(disclaimer_banner())
    sampling = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}
    try:
        engine = open_engine(model, n_ctx=n_ctx)
        if prompt is not None:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}]
            answer(engine, messages, console, sampling)
        else:
            interactive(engine, console, sampling, system)
    except MedtuneError as exc:
        _fail(exc)


@app.callback(invoke_without_command=True)
def main(version: Annotated[bool, typer.Option("--version", help="Print the version and exit")] = False) -> None:
    if version:
        console.print(f"medtune {__version__}")
        raise typer.Exit(0)


if __name__ == "__main__":
    sys.exit(app())
