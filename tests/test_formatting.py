from medtune.data.formatting import ChatFormatter, final_answer

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


def test_final_answer():
    assert final_answer(REPLY) == "C"
    assert final_answer("the answer is (b) and later The answer is D.") == "D"
    assert final_answer("no letter here") is None
