import pytest

from medtune.data.formatting import ChatFormatter

REPLY = "1. Scurvy is vitamin C deficiency.\nSummary: vitamin C.\nThe answer is C."
MESSAGES = [{"role": "user", "content": "Which vitamin deficiency causes scurvy?\nA. A\nB. B\nC. C\nD. D"},
            {"role": "assistant", "content": REPLY}]


def test_loss_covers_exactly_the_reply_and_its_end_of_turn_token(smollm2_tokenizer):
    tok = smollm2_tokenizer
    fmt = ChatFormatter(tok)
    enc = fmt.encode(MESSAGES)
    labelled = [t for t, m in zip(enc.input_ids, enc.loss_mask) if m]
    assert tok.decode(labelled) == REPLY + "<|im_end|>"
    assert labelled[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    first = enc.loss_mask.index(1)
    assert not any(enc.loss_mask[:first])  # no prompt token carries loss
    assert tok.decode(enc.input_ids[:first]) == fmt.prompt_text(MESSAGES[:1])
    assert tok.pad_token_id != fmt.eot_id


def test_multi_turn_and_system_prompt(smollm2_tokenizer):
    fmt = ChatFormatter(smollm2_tokenizer, system_prompt="You are a careful clinician.")
    messages = [*MESSAGES, {"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Collagen."}]
    enc = fmt.encode(messages)
    labelled = [t for t, m in zip(enc.input_ids, enc.loss_mask) if m]
    assert smollm2_tokenizer.decode(labelled) == REPLY + "<|im_end|>" + "Collagen.<|im_end|>"
    text = smollm2_tokenizer.decode(enc.input_ids)
    assert text.startswith("<|im_start|>system\nYou are a careful clinician.<|im_end|>")
    assert "Why?" in text


LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}{{- 'Today Date: 26 Jul 2024\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + "
    "'<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def llama3_style_tokenizer(smollm2_dir):
    """SmolLM2's BPE with Llama 3's special tokens and a Llama-3.2-style template (date lines in a system turn)."""
    from transformers import AutoTokenizer

    from medtune.models import ensure_pad_token

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|begin_of_text|>", "<|start_header_id|>",
                                                          "<|end_header_id|>", "<|eot_id|>",
                                                          "<|finetune_right_pad_id|>"]})
    tok.bos_token = "<|begin_of_text|>"
    tok.chat_template = LLAMA3_TEMPLATE
    tok.pad_token = None  # as Llama 3.2's tokenizer ships
    ensure_pad_token(tok)
    return tok


def test_llama3_style_template_masks_reply_and_eot_only(llama3_style_tokenizer):
    tok = llama3_style_tokenizer
    fmt = ChatFormatter(tok)
    assert fmt.eot == "<|eot_id|>"
    assert tok.pad_token == "<|finetune_right_pad_id|>"
    enc = fmt.encode(MESSAGES)
    labelled = [t for t, m in zip(enc.input_ids, enc.loss_mask) if m]
    assert tok.decode(labelled) == REPLY + "<|eot_id|>"
    first = enc.loss_mask.index(1)
    prompt = tok.decode(enc.input_ids[:first])
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date")
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert enc.input_ids[-1] == tok.convert_tokens_to_ids("<|eot_id|>") and enc.loss_mask[-1] == 1
