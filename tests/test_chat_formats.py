"""The chat-format table agrees with the templates it names: each named Jinja template writes its turns exactly as
its row says (markers, role names, where a system text goes), and the derived token lists keep their order."""

from __future__ import annotations

import pytest

from medtune.chat_formats import (
    ALL_MARKERS,
    END_OF_TURN_TOKENS,
    FORMATS,
    NAMED_TEMPLATES,
    STOP_TOKENS,
    TURN_FORMATS,
    ChatFormat,
)

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3+3?"}]


def table_rendering(fmt: ChatFormat) -> str:
    """CONVERSATION with a generation prompt, written from the table row alone."""

    def turn(role: str, content: str) -> str:
        return f"{fmt.turn_start}{role}{fmt.role_end}{content}{fmt.turn_end}"

    system, first, reply, second = (m["content"] for m in CONVERSATION)
    opening = [turn("user", f"{system}\n\n{first}")] if fmt.fold_system else [turn("system", system),
                                                                             turn("user", first)]
    return "".join([*opening, turn(fmt.reply_role, reply), turn("user", second),
                    f"{fmt.turn_start}{fmt.reply_role}{fmt.role_end}"])


@pytest.mark.parametrize("fmt", NAMED_TEMPLATES.values(), ids=list(NAMED_TEMPLATES))
def test_each_named_template_writes_turns_as_its_row_says(fmt, smollm2_tokenizer):
    text = smollm2_tokenizer.apply_chat_template(CONVERSATION, chat_template=fmt.template, tokenize=False,
                                                 add_generation_prompt=True)
    if "bos_token" in fmt.template:
        text = text.removeprefix(smollm2_tokenizer.bos_token)
    assert text == table_rendering(fmt)
    assert all(marker in fmt.template for marker in fmt.markers)


def test_derived_lists():
    assert set(NAMED_TEMPLATES) == {"chatml", "llama3", "gemma"}
    assert {f.name for f in TURN_FORMATS} == set(NAMED_TEMPLATES)
    # the most specific end-of-turn token first, as models.end_of_turn_token reads them
    assert END_OF_TURN_TOKENS == ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>")
    assert STOP_TOKENS == ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|end|>", "<end_of_turn>")
    assert len(set(ALL_MARKERS)) == len(ALL_MARKERS)
    assert all(t in ALL_MARKERS for f in FORMATS for t in f.markers)
    assert NAMED_TEMPLATES["llama3"].markers == ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
