"""The GGUF types medtune writes, in one table: the name (in `export.types`, `eval.models`, file names and llama.cpp's
`LLAMA_FTYPE_MOSTLY_<name>`), the tensor types a file of that type holds, how far its perplexity may rise over the
float file, and which file the Ollama Modelfile runs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GGUFType:
    name: str
    file_suffix: str  # the file is `<export.name>-<file_suffix>.gguf`
    is_float: bool  # converted from the HF model; every other type is quantized from a float file
    weights: str  # the GGML type most weight matrices get
    # Types llama.cpp's recipe also uses for some tensors: the K-quant mixes raise attn_v/ffn_down/output, and rows
    # whose width is not a multiple of 256 fall back to legacy types.
    also: frozenset[str]
    # Held-out perplexity may rise this much relative to the float file before the file counts as broken. Sanity
    # bounds, not quality claims: a 135M model loses ~6-10% at 4-5 bits, a broken file gains orders of magnitude.
    max_ppl_increase: float
    ollama_rank: int  # the Modelfile runs the exported type of lowest rank (Q4_K_M: small, close to the float file)

    @property
    def uses_imatrix(self) -> bool:
        """llama.cpp weighs this type's rounding by an importance matrix when given one (Q8_0 ignores it)."""
        return not self.is_float and self.name != "Q8_0"

    @property
    def is_k_quant(self) -> bool:
        return self.weights.endswith("_K")


TYPES = (
    GGUFType("F16", "fp16", True, "F16", frozenset(), 0.01, 9),
    GGUFType("BF16", "bf16", True, "BF16", frozenset(), 0.01, 10),
    GGUFType("Q8_0", "Q8_0", False, "Q8_0", frozenset(), 0.05, 6),
    GGUFType("Q6_K", "Q6_K", False, "Q6_K", frozenset({"Q8_0"}), 0.15, 5),
    GGUFType("Q5_K_M", "Q5_K_M", False, "Q5_K", frozenset({"Q6_K", "Q5_1", "Q8_0"}), 0.35, 2),
    GGUFType("Q5_K_S", "Q5_K_S", False, "Q5_K", frozenset({"Q6_K", "Q5_1", "Q8_0"}), 0.35, 3),
    GGUFType("Q4_K_M", "Q4_K_M", False, "Q4_K", frozenset({"Q5_K", "Q6_K", "Q5_0", "Q5_1", "Q8_0"}), 0.5, 0),
    GGUFType("Q4_K_S", "Q4_K_S", False, "Q4_K", frozenset({"Q5_K", "Q6_K", "Q5_0", "Q5_1", "Q8_0"}), 0.5, 1),
    GGUFType("Q4_0", "Q4_0", False, "Q4_0", frozenset({"Q4_1", "Q6_K", "Q8_0"}), 0.6, 4),
    GGUFType("Q3_K_M", "Q3_K_M", False, "Q3_K", frozenset({"Q4_K", "Q5_K", "Q6_K", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}),
             1.0, 7),
    GGUFType("Q2_K", "Q2_K", False, "Q2_K",
             frozenset({"Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}), 3.0, 8),
)
BY_NAME = {t.name: t for t in TYPES}
NAMES = tuple(BY_NAME)
# What a K-quant recipe stores a matrix as when its rows are not a multiple of 256 values (QK_K), e.g. SmolLM2's
# 576-wide rows: llama.cpp's per-tensor fallback to the 32-value block types.
LEGACY_FALLBACKS = frozenset({"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"})


def fallback(type_name: str, matrix_types: dict[str, int]) -> dict[str, object] | None:
    """For a K-quant file, how many of its matrices fell back to a legacy type, by type; None for other types."""
    if not BY_NAME[type_name].is_k_quant:
        return None
    fell = {t: n for t, n in sorted(matrix_types.items()) if t in LEGACY_FALLBACKS}
    total = sum(matrix_types.values())
    return {"matrices": total, "fallback": sum(fell.values()), "fallback_types": fell,
            "most": sum(fell.values()) * 2 > total}


def file_name(name: str, type_name: str) -> str:
    """The seed's names: `<name>-fp16.gguf`, `<name>-Q4_K_M.gguf`, ..."""
    return f"{name}-{BY_NAME[type_name].file_suffix}.gguf"


def ollama_choice(type_names: list[str]) -> str:
    """The type among `type_names` that the Ollama Modelfile runs."""
    return min(type_names, key=lambda n: BY_NAME[n].ollama_rank)
