"""`python -m medtune ...`: the CLI without its installed entry point."""

from medtune.cli import app

app()
