"""How far each quantized GGUF file's next-token distributions move from the tuned F16 file's, and how much of the
tuning each file keeps, computed with llama.cpp itself (llama-cpp-python, every logit of every position).

The text is held out: the run's validation conversations exactly as the data stage tokenized them (chat template,
special tokens), never the training text the importance matrix is calibrated on. Each conversation is evaluated from
an empty context and every next-token prediction in it is scored. The numbers are llama.cpp's
`llama-perplexity --kl-divergence` numbers (BENCHMARKS.md, "Divergence from F16", checks they agree):

- KL divergence, in llama.cpp's direction: KL(P_ref || P_file) = sum_v P_ref(v) (log P_ref(v) - log P_file(v)),
  where P_ref is the tuned F16 file (llama.cpp's `--kl-divergence-base` file); "KLD(file || F16)" in the issue
  means this divergence of the file from F16. `mean_kld`, and `p99_kld`, its 99th percentile over positions
  (linear interpolation, as llama.cpp's `percentile`);
- `same_top`: the share of positions where the file's most likely token is F16's;
- `ppl` and `ppl_reference` on the held-out tokens, `ppl_diff` = ppl - ppl_reference;
- retention = 1 - KL(F16 || file) / KL(F16 || base), with the base model's distributions taken on the same tokens in
  the same direction: 1 when the file behaves as the tuned model, 0 when as the base.

`python -m medtune.export.divergence SPEC_JSON` runs the evaluation in a child process (a llama.cpp build that
crashes on this CPU is reported, not fatal) and prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Positions scored. The demo's validation split (6 conversations) has about 1,100; more text costs one more forward
# pass per file, and a 262k vocabulary makes each position's distribution 1 MB (BENCHMARKS.md measures how stable
# the numbers are at this size).
MAX_POSITIONS = 4096
# Below this KL(F16 || base), in nats, there is no tuning to keep and retention is not computed.
MIN_BASE_KLD = 0.02
ROW_BLOCK = 64  # positions compared at once: a block of a 262k vocabulary in float64 is 134 MB


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities in float64 (the max is subtracted first, as llama.cpp does)."""
    rows = np.asarray(logits, dtype=np.float64)
    shifted = rows - rows.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def position_stats(ref_logp: np.ndarray, logits: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Per position: KL(ref || file), whether the top tokens agree, and both negative log-likelihoods of `targets`."""
    logq = log_softmax(logits)
    ref = np.asarray(ref_logp, dtype=np.float64)
    rows = np.arange(len(targets))
    return {"kld": (np.exp(ref) * (ref - logq)).sum(axis=-1),
            "same_top": ref.argmax(axis=-1) == logq.argmax(axis=-1),
            "nll": -logq[rows, targets], "nll_reference": -ref[rows, targets]}


def summarize(stats: dict[str, np.ndarray]) -> dict[str, Any]:
    """The file's numbers from its per-position statistics."""
    kld = stats["kld"]
    ppl, ppl_ref = float(np.exp(stats["nll"].mean())), float(np.exp(stats["nll_reference"].mean()))
    return {"positions": int(len(kld)), "mean_kld": round(float(kld.mean()), 6),
            "p99_kld": round(float(np.percentile(kld, 99)), 6), "max_kld": round(float(kld.max()), 6),
            "same_top": round(float(stats["same_top"].mean()), 5), "ppl": round(ppl, 4),
            "ppl_reference": round(ppl_ref, 4), "ppl_diff": round(ppl - ppl_ref, 4)}


def retention(kld_file: float, kld_base: float) -> float | None:
    """1 - KL(F16 || file) / KL(F16 || base); None when the tuning moved the distributions less than MIN_BASE_KLD,
    where the ratio would divide by noise (a merged model equal to its base measured 0.0044 nats, and its Q8_0 file
    0.0065: BENCHMARKS.md)."""
    if kld_base < MIN_BASE_KLD:
        return None
    return round(1.0 - kld_file / kld_base, 4)


def held_out(sequences: Sequence[Sequence[int]], max_positions: int = MAX_POSITIONS) -> list[list[int]]:
    """The first conversations up to `max_positions` scored positions (a conversation of n tokens scores n - 1)."""
    chosen, total = [], 0
    for ids in sequences:
        if len(ids) < 2:
            continue
        if total >= max_positions:
            break
        keep = list(map(int, ids[: max_positions - total + 1]))
        chosen.append(keep)
        total += len(keep) - 1
    return chosen


class Reference:
    """The reference file's log-probabilities at every scored position, kept on disk (a 262k vocabulary makes them
    gigabytes); `first`: the first scored position of each sequence (0 here; llama-perplexity scores from n_ctx/2)."""

    def __init__(self, llama: Any, sequences: list[list[int]], folder: Path, first: int = 0) -> None:
        self.sequences, self.first = sequences, first
        n_vocab = llama.llm.n_vocab()
        self.positions = sum(len(s) - 1 - first for s in sequences)
        self.logp = np.lib.format.open_memmap(folder / "reference.npy", mode="w+", dtype=np.float32,
                                              shape=(self.positions, n_vocab))
        at = 0
        for ids in sequences:
            logits = llama(ids)[first : len(ids) - 1]
            for a in range(0, len(logits), ROW_BLOCK):
                block = log_softmax(logits[a : a + ROW_BLOCK])
                self.logp[at + a : at + a + len(block)] = block
            at += len(logits)

    def compare(self, llama: Any) -> dict[str, Any]:
        """Every statistic of one file against the reference, over the same positions."""
        parts: list[dict[str, np.ndarray]] = []
        at = 0
        for ids in self.sequences:
            logits = llama(ids)[self.first : len(ids) - 1]
            targets = np.asarray(ids[self.first + 1 :])
            for a in range(0, len(logits), ROW_BLOCK):
                n = len(logits[a : a + ROW_BLOCK])
                parts.append(position_stats(self.logp[at + a : at + a + n], logits[a : a + n], targets[a : a + n]))
            at += len(logits)
        stats = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return summarize(stats)


def evaluate(spec: dict[str, Any]) -> dict[str, Any]:
    """`spec`: reference (F16 path), files ({name: path}), base (path or None), sequences (token id lists),
    first (default 0). Returns {name: numbers} for every file and `base`, each with its retention."""
    from medtune.export.parity import LlamaLogits

    sequences = spec["sequences"]
    n_ctx = max(map(len, sequences)) + 16
    first = spec.get("first", 0)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        llama = LlamaLogits(spec["reference"], n_ctx)
        reference = Reference(llama, sequences, Path(tmp), first)
        out["reference_seconds"] = round(time.perf_counter() - start, 2)
        del llama
        named = dict(spec["files"])
        if spec.get("base"):
            named["base"] = spec["base"]
        for name, path in named.items():
            start = time.perf_counter()
            llama = LlamaLogits(path, n_ctx)
            if llama.llm.n_vocab() != reference.logp.shape[1]:
                out[name] = {"error": f"vocabulary of {llama.llm.n_vocab()} tokens, the F16 file has "
                                      f"{reference.logp.shape[1]}"}
            else:
                out[name] = {**reference.compare(llama), "seconds": round(time.perf_counter() - start, 2)}
            del llama
    base_kld = out.get("base", {}).get("mean_kld")
    for name in spec["files"]:
        if base_kld is not None and "mean_kld" in out[name]:
            out[name]["retention"] = retention(out[name]["mean_kld"], base_kld)
    return out


if __name__ == "__main__":
    print(json.dumps(evaluate(json.loads(Path(sys.argv[1]).read_text(encoding="utf-8")))))


def measure(reference: Path, files: dict[str, Path], base: Path | None, sequences: list[list[int]],
            first: int = 0) -> dict[str, Any]:
    """`evaluate` in a child process; a crash of llama.cpp becomes one MedtuneError."""
    import subprocess

    from medtune.errors import MedtuneError

    spec = {"reference": str(reference), "files": {k: str(v) for k, v in files.items()},
            "base": None if base is None else str(base), "sequences": sequences, "first": first}
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        proc = subprocess.run([sys.executable, "-m", "medtune.export.divergence", str(spec_path)],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"code {proc.returncode}"
        tail = "\n".join(proc.stderr.strip().splitlines()[-3:])
        raise MedtuneError(f"export: the divergence check (python -m medtune.export.divergence) failed ({how}):\n"
                           f"{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
