"""Inference engines with one interface: `stream()` yields text pieces, `complete()` returns the whole answer.

- `LlamaCppEngine`: a GGUF file through llama-cpp-python, with the file's own chat template and stop tokens.
- `HFEngine`: an HF model directory (merged model, or a PEFT adapter directory on its base) through transformers.

An engine runs one generation at a time (llama.cpp contexts are not thread-safe); callers that share one serialize.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medtune.errors import MedtuneError
from medtune.sampling import N_CTX, context_size

Messages = list[dict[str, str]]

# llama.cpp rounds the context up to a multiple of 256, but llama-cpp-python sizes its token buffers from the number
# asked: with any other number a prompt between the two fails with a numpy broadcast error. So ask for the multiple.
LLAMA_CTX_STEP = 256


class ContextOverflow(MedtuneError):
    """The prompt does not fit the model's context window."""


class Engine:
    finish_reason: str | None = None
    completion_tokens: int = 0
    n_ctx: int = 0

    def stream(self, messages: Messages, temperature: float, top_p: float, max_tokens: int) -> Iterator[str]:
        raise NotImplementedError

    def complete(self, messages: Messages, temperature: float, top_p: float, max_tokens: int) -> dict[str, Any]:
        start = time.perf_counter()
        text = "".join(self.stream(messages, temperature, top_p, max_tokens))
        elapsed = time.perf_counter() - start
        return {
            "text": text,
            "finish_reason": self.finish_reason,
            "completion_tokens": self.completion_tokens,
            "tokens_per_s": round(self.completion_tokens / elapsed, 2) if elapsed > 0 else None,
        }


def llama_context_size(n_ctx: int) -> int:
    """The context size llama.cpp will really use for a request of `n_ctx` tokens."""
    if n_ctx < 1:
        raise MedtuneError(f"n_ctx must be > 0, got {n_ctx}")
    return -(-n_ctx // LLAMA_CTX_STEP) * LLAMA_CTX_STEP


class LlamaCppEngine(Engine):
    def __init__(self, path: str | Path, n_ctx: int = N_CTX, threads: int | None = None, seed: int = 0) -> None:
        from llama_cpp import Llama

        if not Path(path).is_file():
            raise MedtuneError(f"{path}: GGUF file not found")
        self.n_ctx = llama_context_size(n_ctx)
        self.path = Path(path)
        self.llm = Llama(model_path=str(path), n_ctx=self.n_ctx, n_threads=threads or os.cpu_count(), seed=seed,
                         verbose=False)

    def _translate(self, exc: Exception) -> Exception:
        if isinstance(exc, ValueError) and "exceed context window" in str(exc):
            found = re.search(r"Requested tokens \((\d+)\)", str(exc))
            size = f" ({found.group(1)} tokens)" if found else ""
            return ContextOverflow(f"the prompt{size} does not fit the context of {self.n_ctx} tokens; "
                                   "shorten it or raise --n-ctx")
        if type(exc).__module__.startswith("jinja2"):
            return MedtuneError(f"the model's chat template rejected these messages: {exc}")
        return exc

    def chat(self, messages: Messages, stream: bool = False, **sampling: Any) -> Any:
        """llama-cpp-python's OpenAI-shaped chat completion (a dict, or an iterator of chunk dicts when streaming).

        A prompt that does not fit raises `ContextOverflow`, before the first chunk when streaming.
        """
        try:
            result = self.llm.create_chat_completion(messages=messages, stream=stream, **sampling)
            if not stream:
                return result
            first = next(result, None)  # llama-cpp-python checks the prompt's length only when the stream starts
        except Exception as exc:
            raise self._translate(exc) from None
        return self._chunks(first, result)

    def _chunks(self, first: Any, rest: Iterator[Any]) -> Iterator[Any]:
        if first is None:
            return
        yield first
        try:
            yield from rest
        except Exception as exc:
            raise self._translate(exc) from None

    def stream(self, messages: Messages, temperature: float, top_p: float, max_tokens: int) -> Iterator[str]:
        self.finish_reason, self.completion_tokens = None, 0
        for chunk in self.chat(messages, stream=True, temperature=temperature, top_p=top_p, max_tokens=max_tokens):
            choice = chunk["choices"][0]
            delta = choice["delta"]
            if "content" in delta:  # one chunk per generated token, even when it prints nothing
                self.completion_tokens += 1
                if delta["content"]:
                    yield delta["content"]
            if choice["finish_reason"]:
                self.finish_reason = choice["finish_reason"]


class HFEngine(Engine):
    def __init__(self, path: str | Path, device: str | None = None, seed: int = 0) -> None:
        from medtune.models import end_of_turn_ids, load_hf

        path = Path(path)
        if not (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
            raise MedtuneError(f"{path}: neither an HF model directory (config.json) nor a PEFT adapter")
        self.model, self.tokenizer = load_hf(path, device=device)
        self.eos_ids = set(end_of_turn_ids(self.model, self.tokenizer))
        self.n_ctx = context_size(self.model.config)
        self.seed = seed

    def stream(self, messages: Messages, temperature: float, top_p: float, max_tokens: int) -> Iterator[str]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        from medtune.models import chat_prompt_ids

        self.finish_reason, self.completion_tokens = None, 0
        ids = torch.tensor([chat_prompt_ids(self.tokenizer, messages)], device=self.model.device)
        if ids.shape[1] >= self.n_ctx:
            raise ContextOverflow(f"the prompt ({ids.shape[1]} tokens) does not fit the context of {self.n_ctx} "
                                  "tokens; shorten it")
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
            {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        stop = threading.Event()

        class Stop(StoppingCriteria):  # lets a consumer that stops reading (Ctrl-C) end the generation thread too
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

        result: dict[str, Any] = {}

        def work() -> None:
            try:
                result["out"] = self.model.generate(
                    input_ids=ids, attention_mask=ids.new_ones(ids.shape),
                    max_new_tokens=min(max_tokens, self.n_ctx - ids.shape[1]), eos_token_id=list(self.eos_ids),
                    pad_token_id=self.tokenizer.pad_token_id, streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([Stop()]), **sampling)
            except BaseException as exc:  # re-raised in the consumer's thread below
                result["error"] = exc
                streamer.end()

        torch.manual_seed(self.seed)
        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            yield from streamer
        finally:
            stop.set()
            thread.join()
        if "error" in result:
            raise result["error"]
        new = result["out"][0, ids.shape[1]:].tolist()
        self.completion_tokens = len(new)
        self.finish_reason = "stop" if new and new[-1] in self.eos_ids else "length"


def open_engine(path: str | Path, n_ctx: int = N_CTX, threads: int | None = None, seed: int = 0) -> Engine:
    """A GGUF file -> llama.cpp; a directory -> transformers."""
    path = Path(path)
    if path.suffix == ".gguf":
        return LlamaCppEngine(path, n_ctx=n_ctx, threads=threads, seed=seed)
    if path.is_dir():
        return HFEngine(path, seed=seed)
    raise MedtuneError(f"{path}: not a .gguf file or a model directory")
