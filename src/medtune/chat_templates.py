"""Chat templates a config can give a model (`base.chat_template`): a name from this table or a Jinja file.

A base model (not instruct) usually ships no chat template, and a user may want another one. The template set here
is written into the tokenizer the data stage formats with, the merged model's tokenizer files, and so the GGUF
metadata (`tokenizer.chat_template`, copied by llama.cpp's converter) and the Ollama Modelfile built from it.
The named templates are those of `chat_formats`, each with the special tokens it needs (its markers), so a template
the vocabulary cannot tokenize as markers (ChatML on a Gemma tokenizer) is refused before anything long starts.
"""

from __future__ import annotations

from pathlib import Path

from medtune.chat_formats import NAMED_TEMPLATES
from medtune.errors import MedtuneError


def is_file_spec(spec: str) -> bool:
    """A path to a Jinja file rather than a template name."""
    return spec not in NAMED_TEMPLATES and ("/" in spec or Path(spec).suffix in (".jinja", ".j2", ".txt"))


def resolve(spec: str) -> tuple[str, tuple[str, ...]]:
    """`gemma` / `chatml` / `llama3`, or a path to a Jinja file -> (template text, special tokens it needs)."""
    if spec in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[spec].template or "", NAMED_TEMPLATES[spec].markers
    path = Path(spec)
    if is_file_spec(spec):
        if not path.is_file():
            raise MedtuneError(f"base.chat_template: Jinja file not found: {path}")
        text = path.read_text(encoding="utf-8")
        if "messages" not in text:
            raise MedtuneError(f"base.chat_template: {path} does not look like a chat template (no `messages`)")
        return text, ()
    raise MedtuneError(f"base.chat_template {spec!r}: not a named template ({', '.join(NAMED_TEMPLATES)}) nor a "
                       ".jinja file")


def apply(tokenizer: object, spec: str) -> None:
    """Set the tokenizer's chat template from `spec`; its special tokens must each be one token of the vocabulary."""
    text, tokens = resolve(spec)
    vocab = tokenizer.get_vocab()  # type: ignore[attr-defined]
    missing = [t for t in tokens if t not in vocab]
    if missing:
        raise MedtuneError(f"base.chat_template {spec!r}: the tokenizer has no token {missing[0]!r}; pick the template "
                           f"of this model's family ({', '.join(NAMED_TEMPLATES)}) or a Jinja file written for its "
                           "tokens")
    tokenizer.chat_template = text  # type: ignore[attr-defined]
