"""`medtune chat`: one-shot and batch on the SmolLM2 GGUF and HF dir, context overflow, the REPL on a fake engine."""

from __future__ import annotations

import io
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SMOLLM2, medtune, write_jsonl
from rich.console import Console

from medtune.engines import Engine, llama_context_size
from medtune.infer.chat import answer, batch, batch_messages, interactive

QUESTION = ("Please answer the following multiple-choice question:\nWhich organ pumps blood around the body?\n"
            "A. Liver\nB. Heart\nC. Lung\nD. Skin")


@pytest.fixture(scope="module")
def gguf() -> Path:
    from medtune.models import package_file

    return package_file(SMOLLM2)


def medtune_chat(*args: str) -> subprocess.CompletedProcess:
    return medtune("chat", *args, columns=1000, timeout=300)  # one line per message, whatever the terminal


def generated_tokens(stderr: str) -> int:
    found = re.search(r"^(\d+) tokens", stderr, re.M)
    assert found, stderr
    return int(found.group(1))


def test_one_shot_on_gguf(gguf):
    result = medtune_chat("-m", str(gguf), "-p", "Which organ pumps blood?", "--max-tokens", "16",
                          "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert result.stderr.count("not a medical device") == 1  # the disclaimer, once
    assert 0 < generated_tokens(result.stderr) <= 16


def test_batch_answers_good_lines_and_reports_bad_ones(gguf, tmp_path):
    questions = tmp_path / "questions.jsonl"
    questions.write_text("\n".join([
        json.dumps({"id": "q1", "prompt": "Which organ pumps blood?"}),
        "{this is not json",
        "",
        json.dumps({"instruction": QUESTION, "input": ""}),
        json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Name a bone."}]}),
        json.dumps({"question": "wrong field"}),
    ]) + "\n", encoding="utf-8")
    answers = tmp_path / "answers.jsonl"
    result = medtune_chat("-m", str(gguf), "--input", str(questions), "--output", str(answers), "--max-tokens",
                          "16", "--temperature", "0")
    assert result.returncode == 1, result.stderr  # some lines failed
    assert f"{questions}:2: not valid JSON" in result.stderr
    assert f"{questions}:6: needs 'prompt', 'messages'" in result.stderr
    assert "3 answered, 2 failed" in result.stderr
    records = [json.loads(line) for line in answers.read_text(encoding="utf-8").splitlines()]
    assert [r["line"] for r in records] == [1, 4, 5]
    assert records[0]["id"] == "q1"
    for record in records:
        assert record["answer"].strip()
        assert record["finish_reason"] in ("stop", "length")
        assert 0 < record["completion_tokens"] <= 16
        assert "final_answer" in record


def test_prompt_that_does_not_fit_the_context(gguf):
    result = medtune_chat("-m", str(gguf), "-p", "fever " * 400, "--max-tokens", "8", "--n-ctx", "64")
    assert result.returncode == 2
    assert "does not fit the context of 256 tokens" in result.stderr  # llama.cpp's smallest context
    assert "Traceback" not in result.stderr


def test_context_sizes_llama_cpp_really_uses(gguf):
    from medtune.engines import LlamaCppEngine

    assert [llama_context_size(n) for n in (1, 256, 300, 4096)] == [256, 256, 512, 4096]
    # A prompt longer than the number asked but shorter than llama.cpp's rounded context used to fail inside
    # llama-cpp-python with a numpy broadcast error.
    engine = LlamaCppEngine(gguf, n_ctx=300, threads=2)
    result = engine.complete([{"role": "user", "content": "pulse " * 300}], temperature=0.0, top_p=1.0, max_tokens=4)
    assert result["completion_tokens"] > 0


def test_one_shot_on_hf_dir(smollm2_dir):
    result = medtune_chat("-m", str(smollm2_dir), "-p", "Which organ pumps blood?", "--max-tokens", "8",
                          "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert 0 < generated_tokens(result.stderr) <= 8


def test_batch_needs_input_and_output(gguf, tmp_path):
    result = medtune_chat("-m", str(gguf), "--input", str(tmp_path / "q.jsonl"))
    assert result.returncode == 2 and "needs both --input" in result.stderr


# ---- in-process, with a scripted engine ----


class ScriptedEngine(Engine):
    """Replies with canned pieces; `KeyboardInterrupt` among them acts like Ctrl-C mid-reply."""

    def __init__(self, replies: list[list]) -> None:
        self.replies, self.seen = list(replies), []
        self.n_ctx = 100

    def stream(self, messages, temperature, top_p, max_tokens) -> Iterator[str]:
        self.seen.append([dict(m) for m in messages])
        self.finish_reason, self.completion_tokens = None, 0
        for piece in self.replies.pop(0):
            if piece is KeyboardInterrupt:
                raise KeyboardInterrupt
            self.completion_tokens += 1
            yield piece
        self.finish_reason = "stop" if self.completion_tokens < max_tokens else "length"


def scripted_console(lines: list[str]) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    console = Console(file=out, width=200, color_system=None)
    feed = iter(lines)

    def read(prompt: str = "") -> str:
        line = next(feed, None)
        if line is None:
            raise EOFError
        if line == "^C":
            raise KeyboardInterrupt
        return line

    console.input = read  # type: ignore[method-assign]
    return console, out


SAMPLING = {"temperature": 0.7, "top_p": 0.9, "max_tokens": 50}


def test_answer_streams_then_marks_the_final_answer():
    console, out = scripted_console([])
    engine = ScriptedEngine([["Step 1: the heart pumps.\n", "The answer is B."]])
    result = answer(engine, [{"role": "user", "content": QUESTION}], console, SAMPLING)
    assert result["final_answer"] == "B" and result["finish_reason"] == "stop"
    text = out.getvalue()
    assert text.index("Step 1") < text.index("Final answer: B")


def test_ctrl_c_stops_the_reply_but_not_the_repl():
    console, out = scripted_console(["first question", "^C", "second question", "/exit", "never read"])
    engine = ScriptedEngine([["partial ", KeyboardInterrupt, "never shown"], ["second reply"]])
    interactive(engine, console, SAMPLING)
    text = out.getvalue()
    assert "partial" in text and "(stopped)" in text and "never shown" not in text
    assert "second reply" in text
    # the stopped reply stays in the history, so the next turn sees it
    assert engine.seen[1] == [{"role": "user", "content": "first question"},
                              {"role": "assistant", "content": "partial "},
                              {"role": "user", "content": "second question"}]


def test_repl_commands():
    console, out = scripted_console(["hello", "/system Be brief.", "again", "/reset", "/what", "third"])
    engine = ScriptedEngine([["one"], ["two"], ["three"]])
    interactive(engine, console, SAMPLING)  # ends at EOF (Ctrl-D)
    assert engine.seen[1] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "again"}]
    assert engine.seen[2] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "third"}]
    assert "/reset clears the history" in out.getvalue()  # an unknown command shows the help


def test_repl_survives_a_prompt_that_does_not_fit():
    from medtune.engines import ContextOverflow

    class Overflowing(ScriptedEngine):
        def stream(self, messages, temperature, top_p, max_tokens):
            if len(messages) > 2:
                raise ContextOverflow("the prompt (120 tokens) does not fit the context of 100 tokens")
            return super().stream(messages, temperature, top_p, max_tokens)

    console, out = scripted_console(["first", "second", "/reset", "third"])
    engine = Overflowing([["ok"], ["ok again"]])
    interactive(engine, console, SAMPLING)
    assert "does not fit the context of 100 tokens (/reset clears the history)" in out.getvalue()
    assert engine.seen[-1] == [{"role": "user", "content": "third"}]


def test_cut_reason_names_the_limit_that_was_hit():
    console, out = scripted_console([])
    answer(ScriptedEngine([["a"] * 3]), [{"role": "user", "content": "q"}], console, {**SAMPLING, "max_tokens": 3})
    assert "cut at --max-tokens 3" in out.getvalue()


@pytest.mark.parametrize(("record", "expected"), [
    ({"prompt": "Why?"}, [{"role": "user", "content": "Why?"}]),
    ({"prompt": "Why?", "system": "Be kind."}, [{"role": "system", "content": "Be kind."},
                                               {"role": "user", "content": "Why?"}]),
    ({"instruction": "Q?", "input": "Context.", "output": "ignored"}, [{"role": "user", "content": "Q?\n\nContext."}]),
    ({"instruction": "Q?", "input": ""}, [{"role": "user", "content": "Q?"}]),
    ({"messages": [{"role": "user", "content": "Hi"}]}, [{"role": "user", "content": "Hi"}]),
])
def test_batch_record_shapes(record, expected):
    assert batch_messages(record) == expected


@pytest.mark.parametrize(("record", "reason"), [
    ([1, 2], "expected a JSON object"),
    ({"prompt": ""}, "'prompt' must be a non-empty string"),
    ({"prompt": 3}, "'prompt' must be a non-empty string"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0] must be"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "the user's"),
    ({"instruction": "Q?", "input": 4}, "'input' must be a string"),
    ({"text": "x"}, "keys found: text"),
])
def test_batch_rejects_bad_records(record, reason):
    with pytest.raises(ValueError, match=re.escape(reason)):
        batch_messages(record)


def test_batch_all_good_writes_every_answer(tmp_path):
    questions = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "one"}, {"instruction": QUESTION}])
    engine = ScriptedEngine([["fine"], ["Reasoning.\nThe answer is B."]])
    console, _ = scripted_console([])
    counts = batch(engine, questions, tmp_path / "a.jsonl", SAMPLING, console)
    assert counts == {"answered": 2, "failed": 0}
    records = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["final_answer"] for r in records] == [None, "B"]
