"""Inference engines with one interface: `stream()` yields text pieces, `complete()` returns the whole answer.

- `LlamaCppEngine`: a GGUF file through llama-cpp-python, with the file's own chat template and stop tokens.
- `HFEngine`: an HF model directory (merged model, or a PEFT adapter directory on its base) through transformers.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medtune.errors import MedtuneError

Messages = list[dict[str, str]]


class Engine:
    finish_reason: str | None = None
    completion_tokens: int = 0

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


class LlamaCppEngine(Engine):
    def __init__(self, path: str | Path, n_ctx: int = 4096, threads: int | None = None, seed: int = 0) -> None:
        from llama_cpp import Llama

        if not Path(path).is_file():
            raise MedtuneError(f"{path}: GGUF file not found")
        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads or os.cpu_count(), seed=seed,
                         verbose=False)
        self.n_ctx = n_ctx

    def stream(self, messages: Messages, temperature: float, top_p: float, max_tokens: int) -> Iterator[str]:
        self.finish_reason, self.completion_tokens = None, 0
        try:
            chunks = self.llm.create_chat_completion(messages=messages, temperature=temperature, top_p=top_p,
                                                     max_tokens=max_tokens, stream=True)
            for chunk in chunks:
                choice = chunk["choices"][0]
                if "content" in choice["delta"]:  # one chunk per generated token, even when it prints nothing
                    self.completion_tokens += 1
                    if choice["delta"]["content"]:
                        yield choice["delta"]["content"]
                if choice.get("finish_reason"):
                    self.finish_reason = choice["finish_reason"]
        except ValueError as exc:
            if "exceed context window" in str(exc):
                raise MedtuneError(f"the prompt does not fit the context of {self.n_ctx} tokens ({exc}); "
                                   "shorten it, /reset the history, or raise chat.n_ctx") from None
            raise


class HFEngine(Engine):
    def __init__(self, path: str | Path, device: str | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        path = Path(path)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        if (path / "adapter_config.json").is_file():
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=dtype)
            base = model.peft_config["default"].base_model_name_or_path
            self.tokenizer = AutoTokenizer.from_pretrained(base)
        elif (path / "config.json").is_file():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        else:
            raise MedtuneError(f"{path}: neither an HF model directory (config.json) nor a PEFT adapter")
        self.model = model.to(device).eval()
        try:
            generation = GenerationConfig.from_pretrained(path)
            eos = generation.eos_token_id
        except OSError:
            from medtune.models import stop_token_ids

            eos = stop_token_ids(self.tokenizer)
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.n_ctx = getattr(model.config, "max_position_embeddings", 4096)

    def stream(self, messages: Messages, temperature: float, top_p: float, max_tokens: int) -> Iterator[str]:
        from transformers import TextIteratorStreamer

        self.finish_reason, self.completion_tokens = None, 0
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(self.model.device)
        if ids.shape[1] + max_tokens > self.n_ctx:
            raise MedtuneError(f"the prompt ({ids.shape[1]} tokens) plus max tokens ({max_tokens}) does not fit the "
                               f"context of {self.n_ctx}; shorten it or /reset the history")
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
            {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        result: dict[str, Any] = {}

        def work() -> None:
            result["out"] = self.model.generate(input_ids=ids, attention_mask=ids.new_ones(ids.shape),
                                                max_new_tokens=max_tokens, eos_token_id=list(self.eos_ids),
                                                pad_token_id=self.tokenizer.pad_token_id, streamer=streamer,
                                                **sampling)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        yield from streamer
        thread.join()
        new = result["out"][0, ids.shape[1]:].tolist()
        self.completion_tokens = len(new)
        self.finish_reason = "stop" if new and new[-1] in self.eos_ids else "length"


def open_engine(path: str | Path, n_ctx: int = 4096) -> Engine:
    """A GGUF file -> llama.cpp; a directory -> transformers."""
    path = Path(path)
    if path.suffix == ".gguf":
        return LlamaCppEngine(path, n_ctx=n_ctx)
    if path.is_dir():
        return HFEngine(path)
    raise MedtuneError(f"{path}: not a .gguf file or a model directory")
