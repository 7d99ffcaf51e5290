"""The one exception type medtune raises for problems a user can fix."""

from __future__ import annotations


class MedtuneError(Exception):
    """A problem with the user's input or environment: printed as one line, exit code `exit_code`.

    The message names the location (file, line, key) and what to do about it.
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
