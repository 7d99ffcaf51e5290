"""The `medtune` command line: parsing and printing only; the work is done by the stage modules.

Heavy libraries (torch, transformers, llama_cpp) are imported inside the commands, so `medtune --help` is quick.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from medtune import DISCLAIMER, __version__
from medtune.errors import MedtuneError
from medtune.sampling import MAX_TOKENS, N_CTX, TEMPERATURE, TOP_P

if TYPE_CHECKING:
    from medtune.ui import UI

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


@contextlib.contextmanager
def _progress_ui(show: bool = True) -> Iterator[UI]:
    """Progress bars in a terminal, plain progress lines elsewhere (`show=False`: nothing)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from medtune.ui import UI

    if not show:
        yield UI()
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress, UI(console, progress) as ui:
        yield ui


def _run_stages(config: Path, overrides: list[str] | None, names: list[str], force: bool) -> None:
    from medtune.artifacts import RunDir
    from medtune.config import load_config
    from medtune.pipeline import BY_NAME, first_process, run_all, run_stage

    _quiet_libraries()
    try:
        cfg = load_config(config, overrides)
        run_dir = RunDir(cfg.run_dir)
        main = first_process()  # the other processes of a multi-GPU launch print only errors
        with _progress_ui(show=main) as ui:
            if names:
                for name in names:
                    ui.log(f"[bold]{name}[/]: running")
                    run_stage(BY_NAME[name], cfg, run_dir, ui)
            else:
                run_all(cfg, run_dir, ui, force=force)
        if main:
            from medtune.cli.summary import print_summary

            print_summary(cfg, run_dir, console)
            from medtune.report import REPORT

            if (run_dir / REPORT).is_file():
                console.print(f"\n[bold]Report[/] (open it in a browser): {run_dir / REPORT}", highlight=False,
                              soft_wrap=True)
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
                                             "sharegpt, medical_o1, pairs")] = "auto",
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


@app.command("train")
def train_command(
    config: ConfigArg,
    set_: SetOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Estimate the memory per process against the "
                                          "device's, then time a few steps; print tokens, steps, memory and the "
                                          "expected time; train nothing")] = False,
    gpus: Annotated[int, typer.Option(min=1, help="Train on N GPUs of this machine (torchrun; train.strategy "
                                      "ddp or fsdp)")] = 1,
    nnodes: Annotated[int, typer.Option(min=1, help="Machines taking part (run the same command on each, with its "
                                        "own --node-rank)")] = 1,
    node_rank: Annotated[int, typer.Option(min=0, help="This machine's number, 0 to nnodes-1")] = 0,
    master_addr: Annotated[str | None, typer.Option(help="Address of the machine with --node-rank 0, reachable "
                                                    "from all")] = None,
    master_port: Annotated[int | None, typer.Option(min=1, max=65535, help="A free port on that machine (default "
                                                    "29500)")] = None,
) -> None:
    """Train the LoRA adapter on prepared/; write adapter/ with metrics, TensorBoard events and a loss plot.

    A run directory with checkpoints of the same config resumes from the newest one. Over several machines, the
    run directory must be on storage all of them share (checkpoints and the adapter are written by the first).
    """
    from medtune.train import launch

    launched = launch.launched()  # a process of a multi-GPU launch
    launcher = (gpus > 1 or nnodes > 1) and not launched
    worker = launch.worker_args(config, set_)
    try:
        nodes = launch.Nodes(nnodes, node_rank, master_addr, master_port)
        if launched:
            launch.end_with_launcher()
        if launcher and not dry_run:
            launch.launch(gpus, worker, nodes)
            return
    except MedtuneError as exc:
        _fail(exc)
    if not dry_run:
        _run_stages(config, set_, ["train"], force=True)
        return
    _quiet_libraries()
    from medtune.artifacts import RunDir
    from medtune.config import load_config
    from medtune.pipeline import BY_NAME, first_process, run_stage, stage_fingerprint
    from medtune.ui import UI

    try:
        cfg = load_config(config, set_)
        run_dir = RunDir(cfg.run_dir)
        data = BY_NAME["data"]
        if not launched:  # prepared once, before any process of a launch starts
            if not run_dir.is_current(data.folder, stage_fingerprint(data, cfg, run_dir)):
                run_stage(data, cfg, run_dir, UI(console))
        if launcher:  # timed on the N processes the run will have
            launch.launch(gpus, [*worker, "--dry-run"], nodes)
            return
        plan = launch.dry_run(cfg, run_dir, UI(console))
    except MedtuneError as exc:
        _fail(exc)
    if not first_process():
        return
    from rich.table import Table

    table = Table(title=f"dry run: {cfg.name}", show_header=False)
    for key, value in plan.items():
        if key != "dry_run":
            table.add_row(key, str(value))
    console.print(table)


_stage_command("pairs", "Sample replies to the config's pairs.questions, grade them by the answer key; write pairs/.")
_stage_command("merge", "Merge the adapter into the base; write merged/ (safetensors, tokenizer, template).")
_stage_command("export", "Convert merged/ to GGUF F16 and quantize; verify every file; write gguf/.")


@app.command("eval")
def eval_command(
    config: Annotated[Path | None, typer.Argument(help="A run config (YAML): evaluate its eval.models on its "
                                                  "eval.benchmarks. Leave it out to use --model/--benchmark")] = None,
    set_: SetOpt = None,
    model: Annotated[list[str] | None, typer.Option("--model", "-m", help="A .gguf file, an HF model or LoRA "
                                                    "adapter directory, or a hub id; repeat it to compare models "
                                                    "(each against the first)")] = None,
    benchmark: Annotated[list[str] | None, typer.Option("--benchmark", "-b", help="KIND:FILE, KIND one of medqa, "
                                                        "medmcqa, pubmedqa, mmlu; repeatable")] = None,
    mode: Annotated[str, typer.Option(help="generate (chain of thought, answer extracted), loglik (option "
                                      "letters' log-likelihood; HF models only) or cloze (option texts' "
                                      "log-likelihood, no letters shown; HF models only)")] = "generate",
    circular: Annotated[bool, typer.Option("--circular", help="generate/loglik: also ask each item under every "
                                           "circular shift of its options (right only if right under all)")] = False,
    limit: Annotated[int | None, typer.Option(min=1, help="A stratified sample of N items per benchmark")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(min=1, help="Most tokens per generated answer (default: "
                                                       "eval.max_new_tokens's default)")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="HF items per batch (default: 16 on a GPU, "
                                                   "1 generating / 8 scoring on a CPU)")] = None,
    out: Annotated[Path, typer.Option(help="Folder for results.md, summary.json, accuracy.png and the per-item "
                                      "results; run again to resume")] = Path("medtune-eval"),
) -> None:
    """Evaluate models on multiple-choice benchmarks: a run config's models, or any models with --model.

    Writes results.md (accuracy with 95% intervals; with several models, each one's paired difference from the first
    and McNemar's exact test; per benchmark the score of always giving the most common answer, per model its answer
    shares and RStd), summary.json, accuracy.png and per-item JSONL files.
    """
    if config is not None:
        if model or benchmark:
            _fail(MedtuneError("give either a run CONFIG or --model/--benchmark, not both"))
        _run_stages(config, set_, ["eval"], force=True)
        return
    _quiet_libraries()
    from medtune.evaluate.standalone import run as evaluate

    try:
        if set_:
            raise MedtuneError("--set changes a run config; without CONFIG use the options (--mode, --limit, ...)")
        with _progress_ui() as ui:
            evaluate(model or [], benchmark or [], out, ui, mode=mode, circular=circular, limit=limit,
                     max_new_tokens=max_new_tokens, batch_size=batch_size)
        console.print(f"wrote {out / 'results.md'}", highlight=False)
    except MedtuneError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted: finished items are kept; run the same command to go on[/]")
        raise typer.Exit(130) from None


@app.command("run")
def run_command(config: ConfigArg, set_: SetOpt = None,
                force: Annotated[bool, typer.Option(help="Run every stage even if up to date")] = False) -> None:
    """Run the whole chain; stages whose inputs and config did not change are skipped."""
    _run_stages(config, set_, [], force=force)


@app.command("report")
def report_command(run_dir: Annotated[Path, typer.Argument(help="A run folder (a config's run_dir), e.g. runs/demo")]
                   ) -> None:
    """Write RUN_DIR/report.html: every stage's numbers and charts on one page that opens in any browser, offline.

    A run of an older medtune gets the sections its files allow, and the page names the missing ones.
    """
    from medtune.pipeline import STAGES
    from medtune.report import write_report

    try:
        path = write_report(run_dir, STAGES)
    except MedtuneError as exc:
        _fail(exc)
    console.print(f"wrote {path}", highlight=False, soft_wrap=True)


@app.command("chat")
def chat_command(
    model: Annotated[Path, typer.Option("-m", "--model", help="A .gguf file or an HF model/adapter directory")],
    prompt: Annotated[str | None, typer.Option("-p", "--prompt", help="Answer this once and exit")] = None,
    input_: Annotated[Path | None, typer.Option("--input", help="Batch: a JSONL file, one question a line with "
                                                "'prompt', 'messages' or ReasonMed's 'instruction'")] = None,
    output: Annotated[Path | None, typer.Option("--output", help="Batch: the JSONL file of answers to write")] = None,
    system: Annotated[str | None, typer.Option("--system", help="System prompt")] = None,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy")] = TEMPERATURE,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = TOP_P,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens in one reply")] = MAX_TOKENS,
    n_ctx: Annotated[int, typer.Option(min=1, help="Context size for GGUF models (tokens)")] = N_CTX,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads for GGUF models (default: all cores)")] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed")] = 0,
) -> None:
    """Chat with a model: one-shot with -p, batch with --input/--output, interactive otherwise.

    Batch exits 1 when some lines could not be answered (each is reported as file:line).
    """
    _quiet_libraries()
    from medtune.engines import open_engine
    from medtune.infer.chat import answer, batch, disclaimer_banner, interactive

    err_console.print(disclaimer_banner())
    sampling = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}
    try:
        if (input_ is None) != (output is None):
            raise MedtuneError("batch mode needs both --input QUESTIONS.jsonl and --output ANSWERS.jsonl")
        if input_ is not None and prompt is not None:
            raise MedtuneError("give either -p PROMPT or --input/--output, not both")
        engine = open_engine(model, n_ctx=n_ctx, threads=threads, seed=seed)
        if input_ is not None and output is not None:
            counts = batch(engine, input_, output, sampling, err_console)
            err_console.print(f"{counts['answered']} answered, {counts['failed']} failed; wrote {output}",
                              highlight=False)
            raise typer.Exit(1 if counts["failed"] else 0)
        if prompt is not None:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}]
            answer(engine, messages, console, sampling, err_console)
        else:
            interactive(engine, console, sampling, system)
    except MedtuneError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None


@app.command("serve")
def serve_command(
    model: Annotated[Path, typer.Option("-m", "--model", help="The .gguf file to serve")],
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 opens it to the network)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0 picks a free one)")] = 8000,
    api_key: Annotated[str | None, typer.Option(envvar="MEDTUNE_API_KEY", help="Require 'Authorization: Bearer "
                                                "KEY' on every request but /health")] = None,
    n_ctx: Annotated[int, typer.Option(min=1, help="Context size (tokens)")] = N_CTX,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads (default: all cores)")] = None,
) -> None:
    """Serve a GGUF model over an OpenAI-compatible HTTP API: /v1/chat/completions, /v1/models, /health."""
    _quiet_libraries()
    from medtune.infer.chat import disclaimer_banner
    from medtune.infer.server import serve

    err_console.print(disclaimer_banner())
    try:
        serve(model, host=host, port=port, api_key=api_key, n_ctx=n_ctx, threads=threads,
              log=lambda line: err_console.print(line, markup=False, highlight=False, soft_wrap=True))
    except MedtuneError as exc:
        _fail(exc)


@app.callback(invoke_without_command=True)
def main(version: Annotated[bool, typer.Option("--version", help="Print the version and exit")] = False) -> None:
    if version:
        console.print(f"medtune {__version__}")
        raise typer.Exit(0)

