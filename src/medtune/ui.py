"""What a stage may show the user while it runs: log lines and progress, or nothing in tests.

In a terminal, progress is Rich bars. When stdout is not a terminal (CI logs, `nohup`, a pipe), Rich bars print
nothing until they end, so each open task prints a plain line instead: when it starts, when it ends, and whenever it
has been silent for `heartbeat` seconds, even if its step never reports (a background ticker checks every second).
A step with no count (a conversion) is a task with `total=None`; `with ui.step(...)` closes it however the step ends.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

HEARTBEAT_S = 29.0  # the ticker checks each TICK_S, so a waiting user sees a line at least every 30 s
TICK_S = 1.0


@dataclass
class _Task:
    description: str
    total: float | None
    started: float
    printed: float  # clock time of its last plain line
    completed: float = 0
    finished: bool = False
    bar: Any = None  # its Rich task id in a terminal


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def _count(value: float) -> str:
    return f"{value:g}" if value != int(value) else str(int(value))


class UI:
    def __init__(self, console: Any = None, progress: Any = None, heartbeat: float = HEARTBEAT_S,
                 clock: Callable[[], float] = time.monotonic, tick: float | None = TICK_S) -> None:
        """`console`/`progress`: Rich objects (None: show nothing). `tick=None` starts no ticker (tests call
        `tick()` themselves, with a fake `clock`)."""
        self.console, self.progress = console, progress
        self.plain = console is not None and not console.is_terminal
        self.heartbeat, self.clock, self.tick_s = heartbeat, clock, tick
        self._tasks: dict[int, _Task] = {}
        self._lock = threading.Lock()
        self._ticker: threading.Thread | None = None
        self._closed = threading.Event()

    def __enter__(self) -> UI:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log(self, message: str) -> None:
        if self.console is not None:
            self.console.print(message, highlight=False)

    def task(self, description: str, total: float | None) -> int:
        """Open a task of `total` units (None: unknown); returns its id for `update` and `finish`."""
        now = self.clock()
        with self._lock:
            task_id = len(self._tasks)
            task = self._tasks[task_id] = _Task(description, total, started=now, printed=now)
            if self.progress is not None and not self.plain:
                task.bar = self.progress.add_task(description, total=total)
            if self.plain:
                self._print(task, now)
                if self.tick_s is not None and self._ticker is None:
                    self._ticker = threading.Thread(target=self._tick_loop, name="medtune-heartbeat", daemon=True)
                    self._ticker.start()
        return task_id

    def update(self, task: int | None, **fields: Any) -> None:
        """Rich's fields: `advance`, `completed`, `total`, `description`. A task that reaches its total ends."""
        if task is None or task not in self._tasks:
            return
        with self._lock:
            state = self._tasks[task]
            if state.finished:
                return
            state.completed = fields.get("completed", state.completed) + fields.get("advance", 0)
            state.total = fields.get("total", state.total)
            state.description = fields.get("description", state.description)
            if state.bar is not None:
                self.progress.update(state.bar, **fields)
            now = self.clock()
            if state.total is not None and state.completed >= state.total:
                state.finished = True
                self._print(state, now)
            elif self.plain and now - state.printed >= self.heartbeat:
                self._print(state, now)

    def finish(self, task: int | None) -> None:
        """End a task that has no total, or stopped early: its last line, and no more heartbeats for it."""
        if task is None or task not in self._tasks:
            return
        with self._lock:
            state = self._tasks[task]
            if not state.finished:
                state.finished = True
                if state.bar is not None and state.total is None:
                    self.progress.update(state.bar, total=1, completed=1)
                self._print(state, self.clock())

    @contextlib.contextmanager
    def step(self, description: str, total: float | None = None) -> Iterator[int]:
        """A task for the duration of a `with` block, finished even if the block raises."""
        task = self.task(description, total)
        try:
            yield task
        finally:
            self.finish(task)

    def tick(self) -> None:
        """Print a line for every open task that has been silent for `heartbeat` seconds (plain output only)."""
        if not self.plain:
            return
        now = self.clock()
        with self._lock:
            for state in self._tasks.values():
                if not state.finished and now - state.printed >= self.heartbeat:
                    self._print(state, now)

    def close(self) -> None:
        """Stop the ticker (open tasks print no more)."""
        self._closed.set()
        ticker = self._ticker
        if ticker is not None and ticker is not threading.current_thread():
            ticker.join()

    def _tick_loop(self) -> None:
        assert self.tick_s is not None
        while not self._closed.wait(self.tick_s):
            self.tick()
            with self._lock:
                if all(state.finished for state in self._tasks.values()):
                    self._ticker = None  # the next task starts a new one
                    return

    def _print(self, state: _Task, now: float) -> None:
        """One plain progress line (called with the lock held)."""
        state.printed = now
        if not self.plain:
            return
        elapsed = now - state.started
        if state.total:
            line = f"{state.description}: {_count(state.completed)}/{_count(state.total)} " \
                   f"({state.completed / state.total:.0%}), {_duration(elapsed)}"
            if 0 < state.completed < state.total:
                left = elapsed * (state.total - state.completed) / state.completed
                line += f", about {_duration(left)} left"
        elif state.finished:
            line = f"{state.description}: done in {_duration(elapsed)}"
        elif elapsed:
            line = f"{state.description}: running for {_duration(elapsed)}"
        else:
            line = f"{state.description}: started"
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)  # one line, as long as it is
