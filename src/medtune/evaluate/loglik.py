"""Log-likelihood scoring of the options, the way lm-evaluation-harness scores `multiple_choice` tasks.

Each benchmark's prompt is the one of its lm-eval task (medqa_4options, medmcqa, pubmedqa, mmlu), ending in
"Answer:"; each option is the continuation " A" (" yes" for PubMedQA). A continuation is tokenized as lm-eval does:
context and continuation together, the continuation's tokens being whatever follows the context's own tokens. Its
score is the sum of the log-probabilities of those tokens; the prediction is the option with the highest score
(lm-eval's `acc`). The cloze formulation (`cloze_request`) scores each option's text instead of its letter, and
also ranks the options by log-likelihood per character of their text (lm-eval's `acc_norm`). When every option is
one token after the same context, one forward pass over the context scores them all; otherwise each option is
scored on its own.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from medtune.formats.choice import Item
from medtune.sampling import context_size

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class Request:
    """One item's scoring request: the prompt, and the continuation to score for each option letter."""

    context: str
    continuations: dict[str, str]


def loglik_request(item: Item, kind: str) -> Request:
    """The prompt of lm-eval's task for `kind` (zero-shot), with " {letter}" (PubMedQA: " yes"...) per option."""
    options = "".join(f"{letter}. {text}\n" for letter, text in item.options.items())
    letters = {letter: f" {letter}" for letter in item.options}
    if kind == "pubmedqa":
        abstract = "\n".join(item.context.split("\n\n"))  # lm-eval joins the abstract's sections with one newline
        return Request(f"Abstract: {abstract}\nQuestion: {item.question}\nAnswer:",
                       {letter: f" {text}" for letter, text in item.options.items()})
    if kind == "medmcqa":
        return Request(f"Question: {item.question}\nChoices:\n{options}Answer:", letters)
    if kind == "mmlu":
        subject = item.subject.replace("_", " ")
        header = f"The following are multiple choice questions (with answers) about {subject}.\n\n" if subject else ""
        return Request(f"{header}{item.question.strip()}\n{options}Answer:", letters)
    return Request(f"Question: {item.question}\n{options}Answer:", letters)


def cloze_request(item: Item, kind: str) -> Request:
    """The cloze formulation (OLMES; lm-eval's `mmlu_continuation` shape): no options shown, each option's text is
    the continuation " {text}" of "Question: ...\nAnswer:". PubMedQA's labels are already scored this way."""
    if kind == "pubmedqa":
        return loglik_request(item, kind)
    texts = {letter: f" {text}" for letter, text in item.options.items()}
    if kind == "mmlu":
        subject = item.subject.replace("_", " ")
        header = f"The following are questions (with answers) about {subject}.\n\n" if subject else ""
        return Request(f"{header}Question: {item.question.strip()}\nAnswer:", texts)
    return Request(f"Question: {item.question}\nAnswer:", texts)


def encode_pair(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing spaces of the context move to the continuation; the pair is tokenized whole and
    the continuation's tokens are those after the context's own tokenization."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, context_ids = tokenizer.encode(context + continuation), tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


@dataclass
class _Row:
    """One forward pass input and where to read log-probabilities in it: (position, token) pairs per option."""

    tokens: list[int]
    reads: dict[str, list[tuple[int, int]]]


class LoglikScorer:
    """Scores items' options with an HF causal LM; forward passes are batched (left padding) `batch_size` rows."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int = 8) -> None:
        self.model, self.tokenizer, self.batch_size = model, tokenizer, max(1, batch_size)
        self.max_length = context_size(model.config)
        self.keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    def rows(self, request: Request) -> list[_Row]:
        """Rows for one request: one shared row when every option is a single token after the same context."""
        pairs = {letter: encode_pair(self.tokenizer, request.context, cont)
                 for letter, cont in request.continuations.items()}
        contexts = {tuple(ctx) for ctx, _ in pairs.values()}
        if len(contexts) == 1 and all(len(cont) == 1 for _, cont in pairs.values()):
            ctx = list(contexts.pop())[-self.max_length:]
            return [_Row(ctx, {letter: [(len(ctx) - 1, cont[0])] for letter, (_, cont) in pairs.items()})]
        rows = []
        for letter, (ctx, cont) in pairs.items():
            tokens = (ctx + cont)[-(self.max_length + 1):][:-1]  # the last token is only predicted, never input
            first = len(tokens) - len(cont)
            rows.append(_Row(tokens, {letter: [(first + i, token) for i, token in enumerate(cont)]}))
        return rows

    def score(self, requests: list[Request]) -> list[dict[str, float]]:
        """{letter: summed log-probability of its continuation} for each request, in order."""
        rows = [(index, row) for index, request in enumerate(requests) for row in self.rows(request)]
        rows.sort(key=lambda pair: -len(pair[1].tokens))  # similar lengths share a batch: less padding
        scores: list[dict[str, float]] = [{} for _ in requests]
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            for (index, _), found in zip(chunk, self._forward([row for _, row in chunk])):
                scores[index].update(found)
        return [{letter: s[letter] for letter in request.continuations} for s, request in zip(scores, requests)]

    def _forward(self, rows: list[_Row]) -> list[dict[str, float]]:
        """Rows are left-padded (positions counted from each row's first token), so every row's continuation ends
        at the last position: only the logits of the last positions are formed, not of every row's whole width."""
        import torch

        width = max(len(row.tokens) for row in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        shifts = [width - len(row.tokens) for row in rows]
        for i, (row, shift) in enumerate(zip(rows, shifts)):
            ids[i, shift:] = torch.tensor(row.tokens)
            mask[i, shift:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        first_read = min(pos + shift for row, shift in zip(rows, shifts) for reads in row.reads.values()
                         for pos, _ in reads)
        kwargs: dict[str, Any] = {"logits_to_keep": width - first_read} if self.keeps_logits else {}
        offset = first_read if self.keeps_logits else 0
        device = self.model.device
        with torch.inference_mode():
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                position_ids=positions.to(device), **kwargs).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        return [{letter: sum(logprobs[i, pos + shift - offset, token].item() for pos, token in reads)
                 for letter, reads in row.reads.items()} for i, (row, shift) in enumerate(zip(rows, shifts))]


def choose(scores: dict[str, float]) -> str:
    """The option with the highest log-likelihood; a tie goes to the first, as argmax does in lm-eval."""
    return max(scores, key=scores.__getitem__)


def normalized(scores: dict[str, float], options: dict[str, str]) -> dict[str, float]:
    """lm-eval's `acc_norm` scores: each option's log-likelihood divided by the length of its text (see
    `option_length`); the argmax of these is the `acc_norm` prediction."""
    return {letter: score / option_length(options[letter]) for letter, score in scores.items()}


def option_length(text: str) -> int:
    """The length lm-eval's `acc_norm` divides by: characters of the option text, without the " " delimiter
    (lm-eval 0.4 `ConfigurableTask.process_results`: `len(choice)`; its `acc_bytes` would count UTF-8 bytes, the
    same number for ASCII text)."""
    return max(1, len(text))
