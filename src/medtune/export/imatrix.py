"""An importance matrix calibrated on the run's own training conversations, for the quantizations that use one.

`export.imatrix`: `on` (the default) runs llama.cpp's `llama-imatrix` on the F16 file over the training split as the
chat template rendered it (the prepared token ids decoded with their special tokens, which the tool parses back:
`--parse-special`), so the rounding of each weight is weighed by how much the tuned model's own inputs use it;
`off` quantizes without one; a path uses an existing imatrix file (llama.cpp's GGUF or legacy .dat format). The
held-out text of the divergence check is the validation split, never this one. Which types use it: the K-quants
and the other types llama.cpp weighs with one (`GGUFType.uses_imatrix`); Q8_0 and the float files do not.
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from pathlib import Path
from typing import Any

from medtune.errors import MedtuneError
from medtune.prepared import load_split

CHUNK = 512  # llama-imatrix's context: its default, and the demo's max_len
MAX_CHUNKS = 64  # 32k tokens: the demo's whole training split (34 chunks); a large split is sampled down to this
MIN_CHUNK = 64  # a training split under 2 x 64 tokens is too little to calibrate on


def calibration_text(prepared: Path, tokenizer: Any, seed: int) -> tuple[str, dict[str, int]]:
    """The training conversations (a seeded sample, up to MAX_CHUNKS x CHUNK tokens) as one text with special
    tokens written out; and how many conversations and tokens it holds."""
    examples = load_split(prepared, "train")
    order = random.Random(seed).sample(range(len(examples)), len(examples))
    texts, tokens = [], 0
    for i in order:
        if tokens >= MAX_CHUNKS * CHUNK:
            break
        ids = examples[i][0]
        texts.append(tokenizer.decode(ids.tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False))
        tokens += len(ids)
    return "".join(texts), {"conversations": len(texts), "tokens": tokens}


def chunk_size(tokens: int) -> int | None:
    """llama-imatrix needs at least two chunks of text: CHUNK, or a smaller power of two for a small split."""
    size = CHUNK
    while size > MIN_CHUNK and tokens < 2 * size:
        size //= 2
    return size if tokens >= 2 * size else None


def compute(tool: Path, f16: Path, text: str, tokens: int, out: Path) -> dict[str, Any]:
    """Run llama-imatrix on `f16` over `text`; writes `out` (GGUF) and returns what was done."""
    size = chunk_size(tokens)
    if size is None:
        raise MedtuneError(f"the training split has {tokens} tokens; llama-imatrix needs at least {2 * MIN_CHUNK}")
    text_file = out.with_suffix(".calibration.txt")
    text_file.write_text(text, encoding="utf-8")
    cmd = [str(tool), "-m", str(f16), "-f", str(text_file), "-o", str(out), "-c", str(size), "-b", str(size),
           "--chunks", str(MAX_CHUNKS), "--parse-special", "--no-ppl", "-t", str(os.cpu_count() or 1)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    finally:
        text_file.unlink(missing_ok=True)
    if proc.returncode != 0 or not out.is_file():
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise MedtuneError(f"llama-imatrix failed on {f16.name} (code {proc.returncode}): {tail}")
    return {"chunks": min(MAX_CHUNKS, tokens // size), "chunk_tokens": size,
            "seconds": round(time.perf_counter() - start, 2)}
