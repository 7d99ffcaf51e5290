"""Chat templates a config can give a model (`base.chat_template`): a name from this table or a Jinja file.

A base model (not instruct) usually ships no chat template, and a user may want another one. The template set here
is written into the tokenizer the data stage formats with, the merged model's tokenizer files, and so the GGUF
metadata (`tokenizer.chat_template`, copied by llama.cpp's converter) and the Ollama Modelfile built from it.
Each named template states the special tokens it needs, so a template the vocabulary cannot tokenize as markers (ChatML
on a Gemma tokenizer) is refused before anything long starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medtune.errors import MedtuneError


@dataclass(frozen=True)
class NamedTemplate:
    jinja: str
    tokens: tuple[str, ...]  # special tokens the template writes; each must be one token of the vocabulary


# ChatML as SmolLM2 and Qwen write it, without a default system prompt.
CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Llama 3's turns (as Llama-3-Instruct writes them; without 3.2's "Cutting Knowledge Date" system block).
LLAMA3 = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Gemma's turns (google/gemma-3-*-it): no system role, a system text is folded into the first user turn; the
# assistant's role is called `model`; message text is trimmed.
GEMMA = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set first_user_prefix = '' %}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{- message['content'] | trim }}"
    "{{- '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)

NAMED: dict[str, NamedTemplate] = {
    "chatml": NamedTemplate(CHATML, ("<|im_start|>", "<|im_end|>")),
    "llama3": NamedTemplate(LLAMA3, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "gemma": NamedTemplate(GEMMA, ("<start_of_turn>", "<end_of_turn>")),
}


def is_file_spec(spec: str) -> bool:
    """A path to a Jinja file rather than a template name."""
    return spec not in NAMED and ("/" in spec or Path(spec).suffix in (".jinja", ".j2", ".txt"))


def resolve(spec: str) -> tuple[str, tuple[str, ...]]:
    """`gemma` / `chatml` / `llama3`, or a path to a Jinja file -> (template text, special tokens it needs)."""
    if spec in NAMED:
        return NAMED[spec].jinja, NAMED[spec].tokens
    path = Path(spec)
    if is_file_spec(spec):
        if not path.is_file():
            raise MedtuneError(f"base.chat_template: Jinja file not found: {path}")
        text = path.read_text(encoding="utf-8")
        if "messages" not in text:
            raise MedtuneError(f"base.chat_template: {path} does not look like a chat template (no `messages`)")
        return text, ()
    raise MedtuneError(f"base.chat_template {spec!r}: not a named template ({', '.join(NAMED)}) nor a .jinja file")


def apply(tokenizer: object, spec: str) -> None:
    """Set the tokenizer's chat template from `spec`; its special tokens must each be one token of the vocabulary."""
    text, tokens = resolve(spec)
    vocab = tokenizer.get_vocab()  # type: ignore[attr-defined]
    missing = [t for t in tokens if t not in vocab]
    if missing:
        raise MedtuneError(f"base.chat_template {spec!r}: the tokenizer has no token {missing[0]!r}; pick the template "
                           f"of this model's family ({', '.join(NAMED)}) or a Jinja file written for its tokens")
    tokenizer.chat_template = text  # type: ignore[attr-defined]
