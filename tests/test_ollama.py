"""The Ollama Modelfile: its Go TEMPLATE, filled by medtune's Go-template interpreter, equals the HF chat template."""

from __future__ import annotations

import datetime

import pytest

from medtune.config import ChatConfig
from medtune.errors import MedtuneError
from medtune.export import gotemplate, ollama

CHAT = ChatConfig()

CONVERSATION = [
    {"role": "system", "content": "You are a careful medical assistant. Answer briefly."},
    {"role": "user", "content": "Which vitamin deficiency causes scurvy?"},
    {"role": "assistant", "content": "Vitamin C deficiency.\nThe answer is C."},
    {"role": "user", "content": "And which one causes rickets?"},
]

# A Llama 3.2 style template (Meta's, without the tool-calling branches): BOS, the knowledge/today date lines in a
# system turn that is always written, trimmed message text, <|eot_id|> after every turn.
LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                   "<|eom_id|>"]


def fresh_tokenizer(smollm2_dir, template: str | None = None, llama3: bool = False):
    """SmolLM2's tokenizer, optionally with Llama 3's special tokens and another chat template (not the shared one)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    if llama3:
        tokenizer.add_special_tokens({"additional_special_tokens": LLAMA3_SPECIALS})
        tokenizer.bos_token, tokenizer.eos_token = "<|begin_of_text|>", "<|eot_id|>"
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def fill(modelfile_text: str, messages: list[dict[str, str]]) -> str:
    return gotemplate.render(ollama.template_of(modelfile_text), ollama.ollama_values(messages))


def test_chatml_modelfile_renders_like_the_hf_template(smollm2_tokenizer):
    text, checked = ollama.modelfile(smollm2_tokenizer, "demo-Q4_K_M.gguf", "demo", CHAT)
    expected = smollm2_tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert fill(text, CONVERSATION) == expected
    assert expected.endswith("<|im_start|>user\nAnd which one causes rickets?<|im_end|>\n<|im_start|>assistant\n")
    # Without a system message SmolLM2's template writes its default one; the Go template must too.
    no_system = CONVERSATION[1:]
    hf = smollm2_tokenizer.apply_chat_template(no_system, tokenize=False, add_generation_prompt=True)
    assert fill(text, no_system) == hf and "You are a helpful AI assistant named SmolLM" in hf
    assert checked["format"] == "chatml"

    lines = text.splitlines()
    assert "FROM ./demo-Q4_K_M.gguf" in lines
    assert 'PARAMETER stop "<|im_end|>"' in lines


def test_the_modelfile_samples_with_the_run_config_chat_settings(smollm2_tokenizer):
    chat = ChatConfig(temperature=0.3, top_p=0.85, max_tokens=700, n_ctx=2048)
    text, _ = ollama.modelfile(smollm2_tokenizer, "demo-Q4_K_M.gguf", "demo", chat)
    parameters = [line for line in text.splitlines() if line.startswith("PARAMETER") and "stop" not in line]
    assert parameters == ["PARAMETER temperature 0.3", "PARAMETER top_p 0.85", "PARAMETER num_predict 700",
                          "PARAMETER num_ctx 2048"]


def test_llama3_modelfile_renders_like_the_hf_template(smollm2_dir):
    tokenizer = fresh_tokenizer(smollm2_dir, LLAMA3_TEMPLATE, llama3=True)
    text, checked = ollama.modelfile(tokenizer, "m-Q4_K_M.gguf", "m", CHAT)
    expected = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert expected.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge")
    # llama.cpp (and so Ollama) adds BOS as a token; the template text must not carry it a second time.
    assert fill(text, CONVERSATION) == expected.removeprefix("<|begin_of_text|>")
    no_system = CONVERSATION[1:]
    assert fill(text, no_system) == tokenizer.apply_chat_template(
        no_system, tokenize=False, add_generation_prompt=True).removeprefix("<|begin_of_text|>")
    assert checked["format"] == "llama3"

    stops = [line for line in text.splitlines() if line.startswith("PARAMETER stop")]
    for token in ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"):
        assert f'PARAMETER stop "{token}"' in stops
    today = datetime.date.today()
    assert f"Today Date: {today.strftime('%d %b %Y')}" in ollama.template_of(text)
    assert f"fixed at the export date ({today.isoformat()})" in text
    assert "trims message text" in text


def test_an_unknown_chat_format_is_refused(smollm2_dir):
    alpaca = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}"
              "{% if add_generation_prompt %}### assistant:\n{% endif %}")
    with pytest.raises(MedtuneError, match="neither .* as medtune knows them") as refused:
        ollama.modelfile(fresh_tokenizer(smollm2_dir, alpaca), "m-Q4_K_M.gguf", "m", CHAT)
    for known in ("ChatML (<|im_start|>)", "Llama 3 (<|start_header_id|>)", "Gemma (<start_of_turn>)"):
        assert known in str(refused.value)


def test_a_chatml_variant_it_cannot_express_is_refused_not_written_wrong(smollm2_dir):
    # Looks like ChatML on one message, but numbers the later turns: no Go template medtune writes matches it.
    odd = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if loop.index > 2 %}#{{ loop.index }} {% endif %}"
           "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(MedtuneError, match="renders a .*-message conversation differently .* not written"):
        ollama.modelfile(fresh_tokenizer(smollm2_dir, odd), "m-Q4_K_M.gguf", "m", CHAT)


@pytest.mark.parametrize(("template", "data", "expected"), [
    ("a  {{- 1 -}}  b", {}, "a1b"),
    ("{{/* a comment */}}x{{- /* trimmed */ -}} y", {}, "xy"),
    ('{{ if eq .R "a" "b" }}yes{{ else if .S }}s{{ else }}no{{ end }}', {"R": "b"}, "yes"),
    ('{{ if eq .R "a" }}yes{{ else if .S }}s{{ else }}no{{ end }}', {"R": "c", "S": "x"}, "s"),
    ('{{ if and .A (not .B) }}1{{ end }}{{ if or .B .C }}2{{ end }}', {"A": 1, "B": "", "C": [0]}, "12"),
    ("{{ range $i, $m := .M }}{{ $i }}={{ $m.V }};{{ else }}empty{{ end }}", {"M": [{"V": "a"}, {"V": "b"}]},
     "0=a;1=b;"),
    ("{{ range .M }}x{{ else }}empty{{ end }}", {"M": []}, "empty"),
    ("{{ $n := len .M }}{{ (index .M 1).V }}{{ $n }}{{ len (slice .M 1) }}", {"M": [{"V": "a"}, {"V": "b"}]},
     "b21"),
    ('{{ $x := "a" }}{{ if true }}{{ $x = "b" }}{{ end }}{{ $x }}', {}, "b"),
    ('{{ "tab\\there" }}{{ `raw\\n` }}', {}, "tab\there" + "raw\\n"),
    ("{{ .Missing }}{{ if .Missing }}x{{ end }}", {"Missing": ""}, ""),
])
def test_go_template_interpreter(template, data, expected):
    assert gotemplate.render(template, data) == expected


@pytest.mark.parametrize("template", ["{{ .A | printf }}", "{{ upper .A }}", "{{ if .A }}x", "{{ end }}"])
def test_go_template_outside_the_subset_is_an_error(template):
    with pytest.raises(MedtuneError, match="Go template"):
        gotemplate.render(template, {"A": "a"})
