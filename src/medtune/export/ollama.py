"""The Ollama `Modelfile`: FROM the Q4_K_M file, a Go TEMPLATE equal to the model's chat template, its stop tokens.

Ollama does not run the HF (jinja) chat template; it needs a Go text/template over `.Messages`. It is built for the
turn formats of `medtune.chat_formats` (ChatML, Llama 3, Gemma: their markers, the reply's role name, whether a
system text is folded into the first user turn). What the HF template adds around the turns (a default system
prompt, Llama 3.2's "Cutting Knowledge Date / Today Date" lines) is read off its own
rendering of probe conversations, and the Go template built from it must render every probe conversation exactly
as the HF template does, or no Modelfile is written. Limits that Go templates impose, stated in the file: a date the
HF template computes on the day (Llama 3.2's "Today Date") is fixed at the export date; a template that trims
message text (Llama 3, Gemma) is matched for text without leading or trailing whitespace.
"""

from __future__ import annotations

import datetime
from typing import Any

from medtune import __version__
from medtune.chat_formats import BY_NAME, TURN_FORMATS, ChatFormat
from medtune.config import ChatConfig
from medtune.errors import MedtuneError
from medtune.export import gotemplate
from medtune.models import stop_token_ids

PROBE_SYSTEM, PROBE_USER = "SYSTEM-PROBE-7", "USER-PROBE-3"
PROBES: tuple[list[dict[str, str]], ...] = (
    [{"role": "user", "content": "Which organ produces insulin?"}],
    [{"role": "system", "content": "You are a careful medical assistant."},
     {"role": "user", "content": "Which vitamin deficiency causes scurvy?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Define tachycardia.\nKeep it short."}],
    [{"role": "system", "content": "Answer in one line."}, {"role": "user", "content": "What is the normal pH?"},
     {"role": "assistant", "content": "7.35 to 7.45."}, {"role": "user", "content": "And PaCO2?"}],
    [{"role": "user", "content": "Start your answer with 'The answer is'."},
     {"role": "assistant", "content": "The answer is"}],  # an unfinished reply the model continues
)


def _hf_render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The HF template's text for `messages` as Ollama would prompt it: a generation prompt after a user turn, an
    open reply after an assistant turn, and without the BOS text that llama.cpp adds as a token."""
    last_is_reply = messages[-1]["role"] == "assistant"
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=not last_is_reply,
                                         continue_final_message=last_is_reply)
    bos = tokenizer.bos_token
    if bos and "bos_token" in (tokenizer.chat_template or "") and text.startswith(bos):
        text = text[len(bos) :]
    return text


def ollama_values(messages: list[dict[str, str]]) -> dict[str, Any]:
    """The data Ollama hands a `.Messages` template: system texts joined as `.System`, consecutive turns of one
    role merged (ollama/template/template.go, collate)."""
    collated: list[dict[str, str]] = []
    for message in messages:
        if collated and collated[-1]["Role"] == message["role"]:
            collated[-1]["Content"] += "\n\n" + message["content"]
        else:
            collated.append({"Role": message["role"], "Content": message["content"]})
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return {"System": system, "Messages": collated, "Tools": None, "Response": ""}


def _detect(tokenizer: Any) -> tuple[ChatFormat, str, str]:
    """The turn format and what the HF template writes before the turns: (format, default system block, the
    opening of a given system turn; for a format that folds the system text into the first user turn, what
    separates the two texts)."""
    vocab = tokenizer.get_vocab()
    plain = _hf_render(tokenizer, [{"role": "user", "content": PROBE_USER}])
    with_system = _hf_render(tokenizer, [{"role": "system", "content": PROBE_SYSTEM},
                                         {"role": "user", "content": PROBE_USER}])
    for fmt in TURN_FORMATS:
        if fmt.turn_start not in vocab:
            continue
        user_open = f"{fmt.turn_start}user{fmt.role_end}"
        user_turn = f"{user_open}{PROBE_USER}{fmt.turn_end}"
        reply_start = f"{fmt.turn_start}{fmt.reply_role}{fmt.role_end}"
        if not plain.endswith(user_turn + reply_start) or PROBE_SYSTEM not in with_system:
            continue
        default_system = plain[: -len(user_turn + reply_start)]
        system_open, _, after = with_system.partition(PROBE_SYSTEM)
        if fmt.fold_system:
            tail = f"{PROBE_USER}{fmt.turn_end}{reply_start}"
            separator = after.removesuffix(tail)
            if system_open == default_system + user_open and after.endswith(tail) and "{{" not in separator:
                return fmt, default_system, separator
        elif after == fmt.turn_end + user_turn + reply_start:
            return fmt, default_system, system_open
    known = [f"{f.title} ({f.turn_start})" for f in TURN_FORMATS]
    raise MedtuneError(
        f"export: the model's chat template is neither {', '.join(known[:-1])} nor {known[-1]} as medtune knows them, "
        "so no Ollama Modelfile can be written that is known to match it; run the export with ollama=False, or add "
        "the format to medtune/chat_formats.py"
    )


def go_template(fmt: ChatFormat, default_system: str, system_open: str) -> str:
    """A Go TEMPLATE over `.Messages` that renders turns like the HF template (literal text never touches a `{{-`,
    so trimming only removes the line breaks that lay the template out)."""
    start, role_end, end = fmt.turn_start, fmt.role_end, fmt.turn_end
    lines = []
    if fmt.fold_system:
        return _folded_go_template(fmt, default_system, system_open)
    if default_system:
        lines.append(f'{{{{- if .Messages }}}}{{{{ if ne (index .Messages 0).Role "system" }}}}{default_system}'
                     "{{ end }}{{ end }}")
    lines += [
        "{{- range $i, $_ := .Messages }}",
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}",
        f'{{{{- if eq .Role "system" }}}}{system_open}{{{{ .Content }}}}{end}{{{{ else }}}}'
        f'{start}{{{{ .Role }}}}{role_end}{{{{ .Content }}}}'
        f'{{{{ if or (not $last) (ne .Role "assistant") }}}}{end}{{{{ end }}}}{{{{ end }}}}',
        f'{{{{- if and $last (ne .Role "assistant") }}}}{start}assistant{role_end}{{{{ end }}}}',
        "{{- end }}",
    ]
    return "\n".join(lines)


def _folded_go_template(fmt: ChatFormat, prefix: str, separator: str) -> str:
    """Gemma's shape: system messages are not turns; `.System` (every system text, joined) opens the first user turn
    when the conversation starts with a system message; the assistant's turns are written with `fmt.reply_role`."""
    start, role_end, end, reply = fmt.turn_start, fmt.role_end, fmt.turn_end, fmt.reply_role
    first_user = '(or (eq $i 0) (and (eq $i 1) (eq (index $.Messages 0).Role "system")))'
    lines = [
        f"{{{{- if .Messages }}}}{prefix}{{{{ end }}}}" if prefix else "",
        "{{- range $i, $_ := .Messages }}",
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}",
        f'{{{{- if ne .Role "system" }}}}{start}{{{{ if eq .Role "assistant" }}}}{reply}{{{{ else }}}}{{{{ .Role }}}}'
        f'{{{{ end }}}}{role_end}{{{{ if and $.System (eq .Role "user") {first_user} }}}}{{{{ $.System }}}}'
        f'{separator}{{{{ end }}}}{{{{ .Content }}}}'
        f'{{{{ if or (not $last) (ne .Role "assistant") }}}}{end}{{{{ end }}}}{{{{ end }}}}',
        f'{{{{- if and $last (ne .Role "assistant") }}}}{start}{reply}{role_end}{{{{ end }}}}',
        "{{- end }}",
    ]
    return "\n".join(line for line in lines if line)


def chat_template_for_ollama(tokenizer: Any) -> tuple[str, dict[str, Any]]:
    """The Go template and what was checked; raises MedtuneError when it cannot match the HF template."""
    fmt, default_system, system_open = _detect(tokenizer)
    template = go_template(fmt, default_system, system_open)
    for messages in PROBES:
        expected = _hf_render(tokenizer, messages)
        got = gotemplate.render(template, ollama_values(messages))
        if got != expected:
            at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
            raise MedtuneError(
                f"export: the Ollama TEMPLATE medtune built for this {fmt.name} chat template renders a "
                f"{len(messages)}-message conversation differently from the HF template at character {at} "
                f"(HF {expected[at:at + 40]!r}, Go {got[at:at + 40]!r}); the Modelfile was not written"
            )
    padded = [{"role": "user", "content": "  padded text \n"}]
    checked = {"format": fmt.name, "probe_conversations": len(PROBES),
               "default_system_prompt": bool(default_system),
               "padded_text_matches": gotemplate.render(template, ollama_values(padded)) ==
               _hf_render(tokenizer, padded)}
    return template, checked


def stop_tokens(tokenizer: Any, fmt_name: str) -> list[str]:
    """Every end-of-turn token, plus the token that opens a new turn (a model that starts one is done)."""
    tokens = [tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(tokenizer)]
    opener = BY_NAME[fmt_name].turn_start
    return list(dict.fromkeys([*tokens, opener]))


def modelfile(tokenizer: Any, gguf_file: str, name: str, chat: ChatConfig) -> tuple[str, dict[str, Any]]:
    """The Modelfile text and a record of its checks (for the manifest); Ollama samples with the run's `chat`
    settings, as `medtune chat` and the merged model's generation_config do."""
    template, checked = chat_template_for_ollama(tokenizer)
    if '"""' in template:
        raise MedtuneError('export: the chat template contains """, which a Modelfile TEMPLATE cannot hold')
    stops = stop_tokens(tokenizer, checked["format"])
    notes = []
    today = datetime.date.today()
    if any(today.strftime(f) in template for f in ("%d %b %Y", "%d %B %Y", "%Y-%m-%d")):
        notes.append(f"# The HF template writes today's date; a Go template cannot, so it is fixed at the export date "
                     f"({today.isoformat()}).")
    if not checked["padded_text_matches"]:
        notes.append("# The HF template trims message text; this one does not (same result for trimmed text).")
    lines = [
        f"# Ollama Modelfile for {name}, written by medtune {__version__}.",
        f"# Create and run: ollama create {name} -f Modelfile && ollama run {name}",
        "# The TEMPLATE was checked against the model's HF chat template on "
        f"{checked['probe_conversations']} conversations.",
        *notes,
        f"FROM ./{gguf_file}",
        f'TEMPLATE """{template}"""',
        *(f'PARAMETER stop "{token}"' for token in stops),
        f"PARAMETER temperature {chat.temperature}",
        f"PARAMETER top_p {chat.top_p}",
        f"PARAMETER num_predict {chat.max_tokens}",
        f"PARAMETER num_ctx {chat.n_ctx}",
        "",
    ]
    checked["stop"] = stops
    checked["from"] = gguf_file
    return "\n".join(lines), checked


def template_of(modelfile_text: str) -> str:
    """The TEMPLATE of a Modelfile (what `ollama create` reads)."""
    head, sep, rest = modelfile_text.partition('TEMPLATE """')
    template, sep2, _ = rest.partition('"""')
    if not sep or not sep2:
        raise MedtuneError('Modelfile: no TEMPLATE """...""" block')
    return template
