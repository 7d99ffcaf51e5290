"""What a stage may show the user while it runs: log lines and progress bars (Rich), or nothing in tests."""

from __future__ import annotations

from typing import Any


class UI:
    def __init__(self, console: Any = None, progress: Any = None) -> None:
        self.console = console
        self.progress = progress

    def log(self, message: str) -> None:
        if self.console is not None:
            self.console.print(message, highlight=False)

    def task(self, description: str, total: int) -> Any:
        return self.progress.add_task(description, total=total) if self.progress is not None else None

    def update(self, task: Any, **fields: Any) -> None:
        if self.progress is not None and task is not None:
            self.progress.update(task, **fields)
