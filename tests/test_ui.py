"""Progress output: Rich bars in a terminal; elsewhere plain lines, at least one per heartbeat (fake clock)."""

from __future__ import annotations

import io
import time

import pytest
from rich.console import Console

from medtune.ui import UI


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def plain_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=False, width=200), out


def lines(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


def test_plain_output_prints_at_start_each_heartbeat_and_end():
    console, out = plain_console()
    clock = Clock()
    ui = UI(console, heartbeat=30, clock=clock, tick=None)
    task = ui.task("eval base medqa", total=10)
    assert lines(out) == ["eval base medqa: 0/10 (0%), 0s"]
    clock.now += 10
    ui.update(task, advance=3)  # a quick item: no line, the last one is 10 s old
    clock.now += 19
    ui.tick()
    assert len(lines(out)) == 1
    clock.now += 1  # 30 s of silence
    ui.tick()
    assert lines(out)[-1] == "eval base medqa: 3/10 (30%), 30s, about 1m10s left"
    clock.now += 45  # an item that takes longer than the heartbeat: the ticker speaks, then the update
    ui.tick()
    ui.update(task, advance=1)
    assert lines(out)[-1] == "eval base medqa: 3/10 (30%), 1m15s, about 2m55s left"
    assert len(lines(out)) == 3  # the update 0 s after the tick's line printed nothing
    clock.now += 5
    ui.update(task, completed=10)
    assert lines(out)[-1] == "eval base medqa: 10/10 (100%), 1m20s"
    clock.now += 100
    ui.tick()  # a finished task is silent
    assert len(lines(out)) == 4


def test_a_step_without_a_count_reports_while_it_runs_and_when_it_fails():
    console, out = plain_console()
    clock = Clock()
    ui = UI(console, heartbeat=30, clock=clock, tick=None)
    with pytest.raises(RuntimeError), ui.step("export model-fp16.gguf"):
        for _ in range(3):
            clock.now += 30
            ui.tick()
        clock.now += 5
        raise RuntimeError("converter crashed")
    assert lines(out) == ["export model-fp16.gguf: started", "export model-fp16.gguf: running for 30s",
                          "export model-fp16.gguf: running for 1m00s", "export model-fp16.gguf: running for 1m30s",
                          "export model-fp16.gguf: done in 1m35s"]


def test_a_terminal_gets_bars_not_lines():
    from rich.progress import Progress

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    clock = Clock()
    with Progress(console=console, auto_refresh=False) as progress:
        ui = UI(console, progress, heartbeat=30, clock=clock, tick=None)
        task = ui.task("train", total=4)
        clock.now += 60
        ui.tick()
        ui.update(task, advance=2)
        assert progress.tasks[0].completed == 2 and progress.tasks[0].description == "train"
    assert "running for" not in out.getvalue() and "train: 2/4" not in out.getvalue()


def test_the_ticker_prints_while_the_caller_is_blocked():
    console, out = plain_console()
    with UI(console, heartbeat=0.05, tick=0.01) as ui, ui.step("convert"):
        time.sleep(0.4)  # a long call that reports nothing (a converter subprocess)
    running = [line for line in lines(out) if "running for" in line]
    assert len(running) >= 3, lines(out)
    assert lines(out)[0] == "convert: started" and lines(out)[-1].startswith("convert: done in")
    assert ui._ticker is None or not ui._ticker.is_alive()


def test_a_long_description_stays_on_one_line():
    out = io.StringIO()
    long = "eval /a/very/long/path/" + "x" * 300 + ".gguf medqa"
    UI(Console(file=out, force_terminal=False, width=80), tick=None).task(long, total=3)
    assert lines(out) == [f"{long}: 0/3 (0%), 0s"]


def test_nothing_is_shown_without_a_console(capsys):
    ui = UI()
    task = ui.task("eval", total=2)
    ui.update(task, advance=2)
    ui.tick()
    ui.finish(task)
    ui.update(None, advance=1)  # tolerated, as before
    ui.update(task + 1, advance=1)  # a task it never opened likewise
    assert ui._tasks[task].completed == 2 and ui._tasks[task].finished
    assert len(ui._tasks) == 1 and ui._ticker is None  # no heartbeat thread without plain output
    assert capsys.readouterr() == ("", "")
