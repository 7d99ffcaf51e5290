"""What several benchmarks share, so that no bench imports another: the Llama-3.2-1B shape with random weights,
the synthetic ReasonMed-like workload (token ids, and as a ReasonMed JSONL file), packing it into rows, the engine's
`Setup` for a model built by a bench, and the card's measured bf16 matmul rate (the MFU denominator).

Scripts run as `python bench/NAME.py` find this module beside them (the script's folder is first on sys.path).
medtune and torch are imported inside the functions: a script puts src/ on the path before it calls them, and the
data benchmark's peak memory does not count torch.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from medtune.train.setup import Setup

MAX_LEN = 2048
EOT = 128009
PAD = 128004


def llama_1b_config(attn: str):
    """The exact Llama-3.2-1B config (bench models are made from it with random weights), attention `attn`."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        tie_word_embeddings=True, bos_token_id=128000, eos_token_id=[128001, 128008, 128009], pad_token_id=PAD,
        attn_implementation=attn, torch_dtype="bfloat16",
    )


def workload(n: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """`n` examples (ids, reply mask): length lognormal (median 700, sigma 0.6, 160..4096) cut at MAX_LEN, prompt
    120-400 tokens, the last token the end of turn."""
    rng = np.random.default_rng(seed)
    total = np.minimum(np.clip(rng.lognormal(np.log(700), 0.6, n), 160, 4096).astype(int), MAX_LEN)
    out = []
    for t in total:
        prompt = int(min(rng.integers(120, 401), t - 16))
        ids = rng.integers(0, 128000, t).astype(np.int32)
        ids[-1] = EOT
        mask = np.r_[np.zeros(prompt, np.uint8), np.ones(t - prompt, np.uint8)]
        out.append((ids, mask))
    return out


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def matmul_flops() -> float:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / statistics.median(times)


def packed_batches(examples, rows_per_batch: int, seed: int = 0):
    """The examples packed into MAX_LEN-token rows in a seeded order, `rows_per_batch` rows a micro-batch; and the
    packing efficiency."""
    from medtune.data.packing import efficiency, pack

    lengths = [len(ids) for ids, _ in examples]
    rows = pack(lengths, MAX_LEN)
    order = np.random.default_rng(seed).permutation(len(rows))
    batches = [[[examples[i] for i in rows[j]] for j in order[k : k + rows_per_batch]]
               for k in range(0, len(order) - rows_per_batch + 1, rows_per_batch)]
    return batches, efficiency(lengths, rows, MAX_LEN)


def bench_setup(model, loss_model, optimizer, steps: int, precision: str = "bf16",
                device: torch.device | None = None) -> Setup:
    """The engine's view of a model built here: one process, bf16 autocast (or fp32), a constant learning rate."""
    import torch

    from medtune.train.parallel import Distributed
    from medtune.train.setup import Setup

    return Setup(cfg=None, dist=Distributed(), device=device or torch.device("cuda"), precision=precision,
                 model=model, loss_model=loss_model, params=[p for p in model.parameters() if p.requires_grad],
                 weights_gib=0.0,
                 optimizer=optimizer, scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
                 scaler=torch.amp.GradScaler("cuda", enabled=False), window=1, total_steps=steps)


WORDS = ("the patient presents with acute chest pain dyspnea fever renal hepatic cardiac murmur insulin glucose "
         "sodium potassium therapy dose mg antibiotic infection biopsy lesion nerve artery vein syndrome chronic "
         "diagnosis treatment management history examination reveals elevated decreased normal serum level of "
         "and or is was which most likely cause mechanism because therefore option").split()


def synthetic_file(path: Path, n: int, seed: int = 0) -> None:
    """ReasonMed-shaped records; about 1.1 SmolLM2 tokens a word for this vocabulary."""
    rng = np.random.default_rng(seed)
    total = np.clip(rng.lognormal(np.log(700), 0.6, n), 160, 4096).astype(int)
    prompt = np.minimum(rng.integers(120, 401, n), total - 40)
    vocab = np.array(WORDS)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            q = " ".join(vocab[rng.integers(0, len(vocab), int(prompt[i] / 1.1))])
            r = " ".join(vocab[rng.integers(0, len(vocab), int((total[i] - prompt[i]) / 1.1))])
            letter = "ABCD"[i % 4]
            fh.write(json.dumps({
                "instruction": f"Please answer the following multiple-choice question:\nQ{i}: {q}?\n"
                               "A. one\nB. two\nC. three\nD. four",
                "input": "",
                "output": f"{r}\nThe answer is {letter}.",
            }) + "\n")
