"""Which GGUF file of an export to use: the one choice the Modelfile, the model card and the end-of-run summary show.

The rule, in one place: among the files whose chat answers end at the end-of-turn token (export's stop checks) and
that passed every other check, the smallest one that keeps the tuning:

- `retention >= MIN_RETENTION` (0.90): the file's KL divergence from the tuned F16 file is at most a tenth of the
  base model's. Below that, a user runs noticeably less of their fine-tune than they trained; the demo's tuning
  moves the distributions a lot (the base's KL from F16 is large), so a tenth is still a visible shift;
- `mean_kld <= MAX_MEAN_KLD` (0.10 nats): an absolute bound, so that a file is never far from F16 whatever the
  base, and the only one when the tuning moved the distributions too little for a ratio (retention is None below
  `divergence.MIN_BASE_KLD`). llama.cpp's README gives
  about 0.03 for Llama-3-8B Q4_K_M; small models lose more to the same bits (BENCHMARKS.md, "Which file keeps the
  tuning?", has the measured values);
- a file without divergence numbers (the reference itself, F16 or BF16) passes both: it is the tuned model.

A file that does not stop is never recommended, however small. When no quantized file passes, the float file is
the one to use.
"""

from __future__ import annotations

from typing import Any

MIN_RETENTION = 0.90
MAX_MEAN_KLD = 0.10


def _rejection(result: dict[str, Any]) -> str | None:
    """Why a file is not one to use, or None."""
    if result.get("problems"):
        return "failed a check: " + "; ".join(result["problems"])
    if not result.get("stops", True):
        return "its chat answer did not end at the end-of-turn token: " + "; ".join(result.get("stop_problems", []))
    div = result.get("divergence")
    if div is None:
        return None
    if "mean_kld" not in div:
        return f"no divergence numbers ({div.get('error', 'not measured')})"
    if div["mean_kld"] > MAX_MEAN_KLD:
        return f"mean KL divergence from F16 {div['mean_kld']:.4f} > {MAX_MEAN_KLD}"
    if div.get("retention") is not None and div["retention"] < MIN_RETENTION:
        return f"retention {div['retention']:.3f} < {MIN_RETENTION}"
    return None


def recommend(files: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The file to use among an export's `files` ({type: result with bytes, stops, problems, divergence}).

    Returns {type, file, why, rejected: {type: reason}, thresholds}; type and file are None when every file fails.
    """
    rejected = {t: reason for t, r in files.items() if (reason := _rejection(r)) is not None}
    passing = [t for t in files if t not in rejected]
    thresholds = {"min_retention": MIN_RETENTION, "max_mean_kld": MAX_MEAN_KLD}
    if not passing:
        return {"type": None, "file": None, "why": "no file passed its checks", "rejected": rejected,
                "thresholds": thresholds}
    best = min(passing, key=lambda t: files[t]["bytes"])
    div = files[best].get("divergence")
    if div is None:
        why = "the tuned model itself (no quantized file passed)" if len(passing) == 1 else "the smallest passing file"
    else:
        kept = "" if div.get("retention") is None else f", keeps {div['retention']:.1%} of the tuning"
        why = f"the smallest file that stops{kept}, mean KL divergence from F16 {div['mean_kld']:.4f}"
    return {"type": best, "file": files[best]["file"], "why": why, "rejected": rejected, "thresholds": thresholds}
