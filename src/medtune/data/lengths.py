"""What happens to an example longer than `max_len`: truncate, drop, or keep_answer.

`keep_answer` shortens the middle of the last reply: it keeps the prompt, as much of the reply's start as fits,
a marker line "[...]", and the reply's final section intact (from its last "Summary" / "In summary" /
"Conclusion" / "## Final Response" / "Final answer" heading, else its last two non-empty lines), then the
end-of-turn token. The model so still learns to finish every answer with its conclusion.
"""

from __future__ import annotations

import re
from collections import Counter

from medtune.answers import final_answer
from medtune.data.formatting import ChatFormatter, Encoded

MARKER = "\n[...]\n"
MIN_HEAD = 16  # reply tokens kept before the marker, at least
SECTION = re.compile(r"^\s*(?:#+\s*)?(?:summary|in summary|conclusion|final response|final answer)\b", re.I | re.M)


def final_section(reply: str) -> str:
    heads = list(SECTION.finditer(reply))
    if heads:
        return reply[heads[-1].start() :].strip()
    lines = [line for line in reply.strip().splitlines() if line.strip()]
    return "\n".join(lines[-2:])


def truncate(enc: Encoded, max_len: int) -> Encoded:
    return Encoded(enc.input_ids[:max_len], enc.loss_mask[:max_len],
                   [(a, min(b, max_len)) for a, b in enc.reply_spans if a < max_len])


def keep_answer(enc: Encoded, reply: str, max_len: int, formatter: ChatFormatter) -> Encoded | None:
    """The shortened example, or None when the prompt leaves no room for the reply's start and its answer."""
    start = enc.reply_spans[-1][0]
    tail_ids, marker_ids = formatter.tokenize([final_section(reply), MARKER])
    head = max_len - start - 1 - len(marker_ids) - len(tail_ids)  # 1: the end-of-turn token
    if head < MIN_HEAD:
        return None
    reply_ids = enc.input_ids[start : start + head] + marker_ids + tail_ids
    ids = enc.input_ids[:start] + reply_ids + [formatter.eot_id]
    mask = enc.loss_mask[:start] + [1] * (len(reply_ids) + 1)
    return Encoded(ids, mask, [*enc.reply_spans[:-1], (start, start + len(reply_ids))])


def fit(enc: Encoded, reply: str, question: str, max_len: int, policy: str, formatter: ChatFormatter,
        counts: Counter) -> Encoded | None:
    """`enc` within `max_len` by the length policy, counted in `counts` (truncated, truncated_answer_cut,
    shortened_keep_answer); None when it cannot be kept (policy drop, or no room left for the answer)."""
    if len(enc.input_ids) <= max_len:
        return enc
    if policy == "drop":
        return None
    if policy == "keep_answer":
        shortened = keep_answer(enc, reply, max_len, formatter)
        counts["shortened_keep_answer"] += shortened is not None
        return shortened
    counts["truncated"] += 1
    enc = truncate(enc, max_len)
    answer = final_answer(reply, question)
    kept = [t for t, m in zip(enc.input_ids, enc.loss_mask) if m]
    if answer is not None and final_answer(formatter.tokenizer.decode(kept), question) != answer:
        counts["truncated_answer_cut"] += 1
    return enc


def too_long(policy: str, tokens: int, prompt_tokens: int) -> tuple[str, str]:
    """(reason, detail) of an example `fit` could not keep."""
    if policy == "drop":
        return "longer than data.max_len", f"{tokens} tokens"
    return "prompt leaves no room for the answer", f"{prompt_tokens} prompt tokens"
