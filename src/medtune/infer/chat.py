"""`medtune chat`: one-shot (`-p`), interactive, or batch (`--input/--output` JSONL) answers from one engine.

Interactive commands: `/reset` clears the history, `/system TEXT` sets a system prompt, `/exit` leaves;
Ctrl-C stops a generation without leaving. The reply (the reasoning) streams; its final answer is then shown marked.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.markup import escape

from medtune import DISCLAIMER
from medtune.answers import final_answer
from medtune.artifacts import atomic_write_text
from medtune.engines import ContextOverflow, Engine, Messages
from medtune.errors import MedtuneError

ROLES = ("system", "user", "assistant")
HELP = "/reset clears the history, /system TEXT sets a system prompt, /exit (or Ctrl-D) leaves; Ctrl-C stops an answer"


def answer(engine: Engine, messages: Messages, console: Any, sampling: dict[str, Any],
           info: Any = None) -> dict[str, Any]:
    """Stream one reply to `console`, then its final answer; notes go to `info` (default: `console`).

    Ctrl-C stops the generation and returns what was produced so far (finish_reason "interrupted").
    """
    info = info or console
    pieces: list[str] = []
    start = time.perf_counter()
    finish = None
    # The model's text goes to the terminal as it is: rich's print would turn ":heart:" into an emoji, and costs
    # tens of microseconds a token.
    screen = console.file
    try:
        for piece in engine.stream(messages, **sampling):
            pieces.append(piece)
            screen.write(piece)
            screen.flush()
        finish = engine.finish_reason
    except KeyboardInterrupt:
        finish = "interrupted"
    elapsed = time.perf_counter() - start
    console.print()
    text = "".join(pieces)
    letter = final_answer(text, messages[-1]["content"])
    if letter:
        console.print(f"[bold black on green] Final answer: {letter} [/]")
    tokens = engine.completion_tokens
    if finish == "interrupted":
        info.print("[yellow](stopped)[/]")
    elif finish == "length":
        limit = sampling["max_tokens"]
        info.print(f"[yellow](cut at --max-tokens {limit})[/]" if tokens >= limit else
                   f"[yellow](cut at the end of the context, {engine.n_ctx} tokens: /reset or raise --n-ctx)[/]")
    if tokens:
        info.print(f"[dim]{tokens} tokens · {tokens / elapsed:.1f} tokens/s[/]", highlight=False)
    return {"text": text, "final_answer": letter, "finish_reason": finish, "completion_tokens": tokens}


def interactive(engine: Engine, console: Any, sampling: dict[str, Any], system: str | None = None) -> None:
    try:
        import readline  # noqa: F401 (gives input() line editing and arrow-key history)
    except ImportError:
        pass
    history: Messages = []
    console.print(f"[dim]{HELP}.[/]")
    while True:
        try:
            line = console.input("[bold cyan]you>[/] ").strip()
        except EOFError:
            console.print()
            return
        except KeyboardInterrupt:  # like Python's REPL: Ctrl-C drops the line, Ctrl-D or /exit leaves
            console.print("\n[dim](/exit or Ctrl-D leaves)[/]")
            continue
        if not line:
            continue
        if line in ("/exit", "/quit", "/bye"):
            return
        if line == "/reset":
            history.clear()
            console.print("[dim](history cleared)[/]")
            continue
        if line == "/system" or line.startswith("/system "):
            system = line.removeprefix("/system").strip() or None
            history.clear()
            console.print(f"[dim](system prompt {'set' if system else 'removed'}; history cleared)[/]")
            continue
        if line.startswith("/"):
            console.print(f"[dim]{HELP}.[/]")
            continue
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        try:
            reply = answer(engine, messages, console, sampling)
        except MedtuneError as exc:
            history.pop()
            hint = " (/reset clears the history)" if isinstance(exc, ContextOverflow) and history else ""
            console.print(f"[red]{escape(str(exc))}{hint}[/]", highlight=False)
            continue
        history.append({"role": "assistant", "content": reply["text"]})


def disclaimer_banner() -> str:
    return f"[dim italic]{DISCLAIMER}[/]"


# ---- batch mode ----


def _text_field(obj: dict[str, Any], key: str) -> str:
    value = obj[key]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"'{key}' must be a non-empty string")
    return value


def batch_messages(obj: Any) -> Messages:
    """One input record -> messages: {"prompt"[, "system"]}, {"messages": [...]} or ReasonMed {"instruction", "input"}.

    Raises ValueError with the reason when the record has none of these shapes.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ROLES or \
                    not isinstance(message.get("content"), str):
                raise ValueError(f"messages[{i}] must be {{\"role\": one of {', '.join(ROLES)}, \"content\": text}}")
        if messages[-1]["role"] != "user":
            raise ValueError("the last message must be the user's")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if "prompt" in obj:
        system = [{"role": "system", "content": _text_field(obj, "system")}] if obj.get("system") is not None else []
        return [*system, {"role": "user", "content": _text_field(obj, "prompt")}]
    if "instruction" in obj:
        user = _text_field(obj, "instruction").strip()
        context = obj.get("input")
        if context is not None and not isinstance(context, str):
            raise ValueError("'input' must be a string")
        return [{"role": "user", "content": f"{user}\n\n{context.strip()}" if context and context.strip() else user}]
    keys = ", ".join(sorted(obj)) or "none"
    raise ValueError(f"needs 'prompt', 'messages' or ReasonMed's 'instruction' (keys found: {keys})")


def batch(engine: Engine, input_path: Path, output_path: Path, sampling: dict[str, Any], info: Any) -> dict[str, int]:
    """Answer every line of a JSONL file; write one JSON line per answered line to `output_path` (atomically).

    A bad line (or one whose prompt does not fit) is reported as `file:line: reason` on `info`, skipped and counted.
    """
    if not input_path.is_file():
        raise MedtuneError(f"--input {input_path}: file not found")
    if output_path.resolve() == input_path.resolve():
        raise MedtuneError(f"--output {output_path}: is the input file; choose another path")
    if not output_path.parent.is_dir():
        raise MedtuneError(f"--output {output_path}: folder {output_path.parent} does not exist")
    try:
        lines = input_path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise MedtuneError(f"--input {input_path}: not UTF-8 text ({exc})") from None
    records: list[str] = []
    failed = 0
    todo = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
    for done, (number, line) in enumerate(todo, 1):
        where = escape(f"{input_path}:{number}")
        try:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON ({exc})") from None
            messages = batch_messages(obj)
            result = engine.complete(messages, **sampling)
        except (ValueError, MedtuneError) as exc:  # a bad record, or a prompt that does not fit
            failed += 1
            info.print(f"[red]{where}: {escape(str(exc))}; skipped[/]", highlight=False, soft_wrap=True)
            continue
        letter = final_answer(result["text"], messages[-1]["content"])
        record = {"line": number, **({"id": obj["id"]} if "id" in obj else {}), "answer": result["text"],
                  "final_answer": letter, "finish_reason": result["finish_reason"],
                  "completion_tokens": result["completion_tokens"], "tokens_per_s": result["tokens_per_s"]}
        records.append(json.dumps(record, ensure_ascii=False) + "\n")
        info.print(f"[dim]{where}: answered ({done}/{len(todo)}; final answer {letter or '-'}, "
                   f"{result['completion_tokens']} tokens, {result['finish_reason']})[/]", highlight=False,
                   soft_wrap=True)
    atomic_write_text(output_path, "".join(records))
    return {"answered": len(records), "failed": failed}
