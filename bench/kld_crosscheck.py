"""Does export's divergence check give llama-perplexity's numbers? Both on the same tokens, files and positions.

llama.cpp's `llama-perplexity` (built by medtune.export.tools from the same source as the runtime) writes the F16
file's log-probabilities with `--kl-divergence-base`, then reads them back for a quantized file with
`--kl-divergence`. Its base file also holds the tokens it scored (the text cut into chunks of `-c` tokens; each chunk
starts with BOS when the vocabulary adds one; positions from n_ctx/2 on are scored). medtune.export.divergence runs on
exactly those chunks and positions, and the two sets of numbers are compared: mean KLD (target: within 1% relative),
99th percentile, same top token (target: within 0.5 points), perplexities.

    PYTHONPATH=src python bench/kld_crosscheck.py RUN_DIR [--types Q4_K_M Q8_0] [--ctx 256]

The text: the run's validation conversations decoded from prepared/ (special tokens written out; llama-perplexity
tokenizes them as plain text, which is fine for this comparison, as both sides read the same token ids).
Raw JSON: bench/results/kld_crosscheck.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

PATTERNS = {"mean_kld": r"Mean\s+KLD:\s+([-\d.]+)", "p99_kld": r"99\.0%\s+KLD:\s+([-\d.]+)",
            "same_top": r"Same top p:\s+([-\d.]+)", "ppl": r"Mean PPL\(Q\)\s+:\s+([-\d.]+)",
            "ppl_reference": r"Mean PPL\(base\)\s+:\s+([-\d.]+)"}


def base_file_tokens(path: Path) -> tuple[int, list[list[int]]]:
    """n_ctx and the chunks of token ids in a llama-perplexity --kl-divergence-base file."""
    with open(path, "rb") as fh:
        assert fh.read(8) == b"_logits_", path
        n_ctx, n_vocab, n_chunk = np.frombuffer(fh.read(12), dtype=np.int32).tolist()
        tokens = np.frombuffer(fh.read(4 * n_ctx * n_chunk), dtype=np.int32)
    return n_ctx, [tokens[i * n_ctx : (i + 1) * n_ctx].tolist() for i in range(n_chunk)]


def run_tool(cmd: list[str]) -> tuple[str, float]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout + proc.stderr, round(time.perf_counter() - start, 2)


def main() -> None:
    from llama_cpp import Llama

    from medtune.export import divergence
    from medtune.export.tools import tools
    from medtune.models import load_tokenizer
    from medtune.prepared import load_split

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--types", nargs="+", default=["Q4_K_M", "Q8_0"])
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "kld_crosscheck.json")
    args = parser.parse_args()
    manifest = json.loads((args.run_dir / "gguf" / "manifest.json").read_text())["results"]
    files = {t: args.run_dir / "gguf" / r["file"] for t, r in manifest["files"].items()}
    perplexity = tools(("llama-perplexity",))["llama-perplexity"]
    tokenizer = load_tokenizer(str(args.run_dir / "merged"))
    text = "".join(tokenizer.decode(ids.tolist(), skip_special_tokens=False)
                   for ids, _ in load_split(args.run_dir / "prepared", "val"))
    threads = str(os.cpu_count() or 1)
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {threads} cpus",
                              "command": " ".join(sys.argv), "ctx": args.ctx, "files": {}}
    with tempfile.TemporaryDirectory() as tmp:
        text_file, base = Path(tmp) / "held_out.txt", Path(tmp) / "f16.kld"
        text_file.write_text(text, encoding="utf-8")
        _, result["tool_reference_seconds"] = run_tool(
            [str(perplexity), "-m", str(files["F16"]), "-f", str(text_file), "-c", str(args.ctx), "-b", str(args.ctx),
             "-t", threads, "--kl-divergence-base", str(base)])
        n_ctx, chunks = base_file_tokens(base)
        add_bos = Llama(model_path=str(files["F16"]), vocab_only=True, verbose=False)._model.add_bos_token()
        if add_bos:  # llama-perplexity replaces each chunk's first token by BOS before evaluating it
            chunks = [[tokenizer.bos_token_id, *c[1:]] for c in chunks]
        ours = divergence.measure(files["F16"], {t: files[t] for t in args.types}, None, chunks, first=n_ctx // 2)
        result["positions"] = len(chunks) * (n_ctx - 1 - n_ctx // 2)
        for t in args.types:
            log, seconds = run_tool([str(perplexity), "-m", str(files[t]), "-c", str(args.ctx), "-b", str(args.ctx),
                                     "-t", threads, "--kl-divergence-base", str(base), "--kl-divergence"])
            tool = {k: float(m.group(1)) for k, p in PATTERNS.items() if (m := re.search(p, log))}
            tool["same_top"] /= 100
            mine = ours[t]
            result["files"][t] = {
                "llama_perplexity": {**tool, "seconds": seconds}, "medtune": mine,
                "mean_kld_relative_difference": round(mine["mean_kld"] / tool["mean_kld"] - 1, 5),
                "same_top_difference_points": round(100 * (mine["same_top"] - tool["same_top"]), 3)}
            print(t, json.dumps(result["files"][t]["mean_kld_relative_difference"]),
                  result["files"][t]["same_top_difference_points"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
