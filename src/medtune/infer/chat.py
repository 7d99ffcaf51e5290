"""`medtune chat`: one-shot (`-p`) or interactive chat with a GGUF file or an HF model directory.

Interactive commands: `/reset` clears the history, `/system TEXT` sets a system prompt, `/exit` leaves;
Ctrl-C stops a generation without leaving. The reply streams; its final answer line is then shown on its own.
"""

from __future__ import annotations

from typing import Any

from medtune import DISCLAIMER
from medtune.evaluate.extract import EXPLICIT
from medtune.infer.engines import Engine


def final_answer_line(text: str) -> str | None:
    found = list(EXPLICIT.finditer(text))
    return found[-1].group(1).upper() if found else None


def answer(engine: Engine, messages: list[dict[str, str]], console: Any, sampling: dict[str, Any]) -> str:
    """Stream one reply to the console; returns the text (partial if interrupted)."""
    pieces: list[str] = []
    try:
        for piece in engine.stream(messages, **sampling):
            pieces.append(piece)
            console.print(piece, end="", markup=False, highlight=False, soft_wrap=True)
    except KeyboardInterrupt:
        console.print("\n[yellow](stopped)[/]")
    console.print()
    text = "".join(pieces)
    letter = final_answer_line(text)
    if letter:
        console.print(f"[bold green]Final answer: {letter}[/]")
    if engine.finish_reason == "length":
        console.print(f"[yellow](cut at --max-tokens {sampling['max_tokens']})[/]")
    return text


def interactive(engine: Engine, console: Any, sampling: dict[str, Any], system: str | None = None) -> None:
    history: list[dict[str, str]] = []
    console.print("[dim]/reset clears the history, /system TEXT sets a system prompt, /exit leaves; "
                  "Ctrl-C stops an answer.[/]")
    while True:
        try:
            line = console.input("[bold cyan]you>[/] ").strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history.clear()
            console.print("[dim](history cleared)[/]")
            continue
        if line.startswith("/system"):
            system = line.removeprefix("/system").strip() or None
            history.clear()
            console.print(f"[dim](system prompt {'set' if system else 'removed'}; history cleared)[/]")
            continue
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        reply = answer(engine, messages, console, sampling)
        history.append({"role": "assistant", "content": reply})


def disclaimer_banner() -> str:
    return f"[dim italic]{DISCLAIMER}[/]"
