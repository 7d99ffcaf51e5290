"""Typed configuration for a whole run: one YAML file, one section per stage, `--set a.b=c` overrides.

Relative paths in a config are resolved against the folder that holds the config file, so a run gives the same
result from any working directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medtune import chat_templates, gguf_types, sampling
from medtune.errors import MedtuneError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BaseModelConfig(Section):
    """Where the base model comes from: a hub id, a local HF directory, a GGUF file or `pkg:<package>/<file.gguf>`."""

    model: str
    revision: str | None = None
    # a base without a chat template (or another one wanted): `gemma`, `chatml`, `llama3` or a Jinja file
    chat_template: str | None = None


class DataConfig(Section):
    path: Path | None = None
    dataset: str | None = None  # hub dataset id, e.g. lingshu-medical-mllm/ReasonMed
    data_file: str | None = None  # one file inside the hub dataset, e.g. ReasonMed.json; unset: stream a split
    config: str | None = None  # the dataset's configuration (subset), as the `datasets` library names it
    split: str = "train"  # the split streamed when data_file is unset
    revision: str | None = None
    schema_: Literal["auto", "reasonmed", "conversations", "messages", "sharegpt", "medical_o1", "pairs",
                     "multiple_choice", "medmcqa", "pubmedqa"] = Field("auto", alias="schema")
    strict: bool = False  # fail on any rejected record instead of skipping it
    system_prompt: str | None = None
    max_len: int = Field(512, gt=16)
    # At the cap: keep_answer (shorten the middle of the reasoning, keep its start and the final summary/answer),
    # truncate (the seed's behaviour), or drop the example. keep_answer by default: on the quality study's training
    # file (README, "Does tuning help?") truncation at 512 tokens cut the final answer off 274 of 2,209 records and
    # left nothing to learn in 56 more; a model shown answers that stop mid-reasoning learns to stop without one.
    length_policy: Literal["truncate", "drop", "keep_answer"] = "keep_answer"
    packing: bool = False  # pack examples into rows of max_len (position ids restart per example)
    contamination: Literal["report", "drop", "ignore"] = "report"  # vs the eval benchmarks of this run
    max_chars: int = Field(200_000, gt=0)  # longer records are rejected as absurd
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    limit: int | None = Field(None, gt=0)
    # Re-letter multiple-choice records so that their gold letters are uniform (seeded by the run's seed; references
    # to option letters in the reply rewritten; medtune.formats.relabel). The quality study's training answers were
    # 34% "A" and its tuned models answered "A" 62-75% of the time. false: the records exactly as read.
    balance_letters: bool = True

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        # neither is the pairs stage's output (checked with the whole config in Config._data_source)
        if self.path is not None and self.dataset is not None:
            raise ValueError("set exactly one of data.path (a local file) or data.dataset (a hub dataset id)")
        if self.dataset is None and (self.data_file is not None or self.config is not None):
            raise ValueError("data.data_file and data.config name parts of a hub dataset: set data.dataset too")
        return self


class LoraConfig(Section):
    r: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    dora: bool = False  # weight-decomposed LoRA (PEFT use_dora)
    # tokens whose embedding rows are trained too (PEFT trainable_token_indices): a base model's chat markers, which
    # it never saw in pre-training (base Gemma gives <end_of_turn> a probability near 1e-14: it could never stop)
    trainable_tokens: list[str] = []
    # where such a row starts: {token: another token whose row it copies}. An end-of-turn marker the base never
    # predicts can end a reply from the first step when it starts as the end-of-sequence row (Gemma:
    # {"<end_of_turn>": "<eos>"}: p(<end_of_turn>) after an answer goes from 5.6e-15 to 0.0085 before any training)
    trainable_tokens_from: dict[str, str] = {}

    @model_validator(mode="after")
    def _starts_name_trainable_tokens(self) -> LoraConfig:
        stray = [t for t in self.trainable_tokens_from if t not in self.trainable_tokens]
        if stray:
            raise ValueError(f"train.lora.trainable_tokens_from names {stray[0]!r}, which is not in "
                             "train.lora.trainable_tokens: add it there, or remove it here")
        return self


class PreferenceConfig(Section):
    """DPO / ORPO settings (train.objective dpo or orpo)."""

    beta: float = Field(0.1, gt=0)  # DPO: strength of the pull towards the reference model
    loss: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"  # DPO loss variant
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # `robust` (and `sigmoid`): assumed share of flipped labels
    nll_weight: float = Field(0.0, ge=0)  # NLL on the chosen reply added to DPO: 0 = plain DPO, 1 = RPO
    orpo_lambda: float = Field(0.1, gt=0)  # ORPO: weight of the odds-ratio term next to the chosen reply's NLL


class TrainConfig(Section):
    # sft: next-token loss on the replies; dpo / orpo: preference pairs {"prompt", "chosen", "rejected"}
    objective: Literal["sft", "dpo", "orpo"] = "sft"
    preference: PreferenceConfig = PreferenceConfig()
    lora: LoraConfig = LoraConfig()
    optimizer: Literal["adafactor", "adamw"] = "adafactor"
    epochs: float = Field(3.0, gt=0)
    max_steps: int | None = Field(None, gt=0)
    batch_size: int = Field(4, gt=0)
    grad_accum: int = Field(4, gt=0)
    lr: float = Field(2e-4, gt=0)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: the model's default (sdpa); flex_attention runs packed rows block-sparse; varlen: PyTorch's
    # FlashAttention over the examples of packed rows (CUDA) — see BENCHMARKS.md
    attention: Literal["auto", "sdpa", "flex_attention", "varlen", "eager"] = "auto"
    compile: bool = False  # torch.compile the decoder (GPU; packed rows give it fixed shapes)
    # recompute each decoder layer's activations in the backward pass: a fraction of the memory for about a quarter
    # more compute (the activations, not the weights, fill memory at long rows)
    gradient_checkpointing: bool = False
    logging_steps: int = Field(1, gt=0)
    eval_steps: int | None = Field(None, gt=0)  # validation loss every N steps (and always at start and end)
    checkpoint_steps: int = Field(100, gt=0)  # checkpoint every N steps (and at the end)
    keep_checkpoints: int = Field(2, gt=0)  # the newest K are kept
    qlora: bool = False  # 4-bit base through bitsandbytes (GPU only)
    # fp8: the frozen decoder linears stored in FP8 (e4m3, a scale per row) and multiplied on FP8 tensor cores
    # (GPUs of compute capability 8.9+: Ada, Hopper); LoRA itself trains as with bf16 (train/fp8.py)
    base_precision: Literal["bf16", "fp8"] = "bf16"
    # several GPUs (--gpus N): ddp keeps the whole base on every GPU; fsdp shards it (bases too large for one card)
    strategy: Literal["ddp", "fsdp"] = "ddp"
    tensorboard: bool = True
    threads: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _fp8_combinations(self) -> TrainConfig:
        if self.base_precision != "fp8":
            return self
        if self.qlora:
            raise ValueError("train.base_precision fp8 and train.qlora do not combine (QLoRA stores the base in 4 "
                             "bits): set one of them")
        if self.precision in ("fp32", "fp16"):
            raise ValueError(f"train.base_precision fp8 computes in bf16: set train.precision bf16 or auto (got "
                             f"{self.precision})")
        if self.lora.dora:
            raise ValueError("train.base_precision fp8 does not combine with train.lora.dora (DoRA's magnitudes need "
                             "each whole weight in full precision); use base_precision bf16")
        if self.strategy == "fsdp":
            raise ValueError("train.base_precision fp8 does not combine with train.strategy fsdp (FP8 weights are "
                             "not sharded); use strategy ddp, where the FP8 base takes half the memory of bf16")
        return self


class MergeConfig(Section):
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    check_prompts: list[str] = [
        "Which vitamin deficiency causes scurvy?",
        "A 60-year-old man has crushing chest pain radiating to the left arm. What is the first test to order?",
    ]
    tolerance: float | None = Field(None, gt=0)  # None: chosen from the dtype


class ExportConfig(Section):
    name: str
    types: list[str] = ["F16", "Q8_0", "Q5_K_M", "Q4_K_M"]
    check_prompt: str = "Which organ produces insulin? Answer in one sentence."
    ollama: bool = True  # write the Ollama Modelfile (ChatML and Llama 3 chat templates)
    # importance matrix for the types llama.cpp weighs with one (K-quants): `on` calibrates it on the run's training
    # conversations with llama-imatrix, `off` quantizes without, or the path of an existing imatrix file
    imatrix: Literal["on", "off"] | Path = "on"

    @field_validator("imatrix", mode="before")
    @classmethod
    def _imatrix_switch(cls, value: Any) -> Any:
        if isinstance(value, bool):  # YAML reads a bare on / off as a boolean
            return "on" if value else "off"
        if isinstance(value, str) and value.strip().lower() in ("on", "off", "true", "false", "yes", "no"):
            return "on" if value.strip().lower() in ("on", "true", "yes") else "off"
        if isinstance(value, str) and not value.strip():
            raise ValueError("expected on, off or the path of an imatrix file")
        return value

    @field_validator("types")
    @classmethod
    def _known_types(cls, value: list[str]) -> list[str]:
        unknown = [t for t in value if t not in gguf_types.BY_NAME]
        if unknown:
            raise ValueError(f"unknown GGUF type(s) {unknown}; choose from {list(gguf_types.NAMES)}")
        if not any(gguf_types.BY_NAME[t].is_float for t in value):
            raise ValueError("types must include F16 or BF16: every quantization starts from it")
        return value


class ChatConfig(Section):
    temperature: float = Field(sampling.TEMPERATURE, ge=0)
    top_p: float = Field(sampling.TOP_P, gt=0, le=1)
    max_tokens: int = Field(sampling.MAX_TOKENS, gt=0)
    n_ctx: int = Field(sampling.N_CTX, gt=0)


class PairsConfig(Section):
    """Preference pairs from a model's own sampled replies, graded by the answer key (`medtune pairs`)."""

    questions: Path  # multiple-choice questions with answer keys
    kind: Literal["medqa", "medmcqa", "pubmedqa", "mmlu", "reasonmed"] = "medqa"  # a benchmark reader's shape
    model: str | None = None  # the model that samples (e.g. an earlier run's merged/); None: base.model
    samples: int = Field(8, gt=0)  # replies sampled per question
    temperature: float = Field(0.8, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(1024, gt=0)
    batch_size: int | None = Field(None, gt=0)  # replies per generate call; None: 64 on a GPU, 8 on a CPU
    max_pairs_per_question: int = Field(4, gt=0)
    include_reference: bool = False  # the record's own reasoning, when it ends in the right answer, is a chosen reply
    limit: int | None = Field(None, gt=0)  # the first N questions not refused as evaluation questions
    # each question's options permuted (seeded) so that the gold letters of the sampled questions are uniform;
    # chosen and rejected replies are both sampled under that permutation. PubMedQA's yes/no/maybe never move.
    balance_letters: bool = True


class BenchmarkConfig(Section):
    name: str
    path: Path  # local file (PubMedQA: ori_pqal.json with test_ground_truth.json beside it; MMLU: file or folder)
    kind: Literal["medqa", "medmcqa", "pubmedqa", "mmlu"] = "medqa"


class EvalConfig(Section):
    benchmarks: list[BenchmarkConfig] = []
    models: list[str] = ["Q4_K_M"]  # GGUF types of this run, "merged", or paths
    limit: int | None = Field(None, gt=0)  # a stratified sample of each benchmark (by answer letter, subject)
    max_new_tokens: int = Field(512, gt=0)
    # loglik: the option letters' log-likelihood, lm-eval style; cloze: the option texts' (no letters shown); HF only
    mode: Literal["generate", "loglik", "cloze"] = "generate"
    # generate / loglik: also ask each item under every circular shift of its options (right only if right under all)
    circular: bool = False
    batch_size: int | None = Field(None, gt=0)  # HF items per batch; None: 16 on a GPU, 1 (generate) / 8 (loglik)
    # mode generate: these HF models ("base", "merged", paths) are also scored by log-likelihood, into eval/loglik/
    loglik_models: list[str] = []
    # how eval/loglik/ scores them: the option letters (lm-eval's MC prompts) or the option texts (cloze, OLMES)
    loglik_formulation: Literal["letters", "cloze"] = "letters"

    @model_validator(mode="after")
    def _circular_needs_letters(self) -> EvalConfig:
        if self.circular and self.mode == "cloze":
            raise ValueError("eval.circular applies to mode generate or loglik: mode cloze shows no option letters, "
                             "so their order cannot favour one; set eval.circular: false or another mode")
        return self


class Config(Section):
    name: str
    run_dir: Path
    seed: int = 42
    base: BaseModelConfig
    data: DataConfig
    train: TrainConfig = TrainConfig()
    merge: MergeConfig = MergeConfig()
    export: ExportConfig
    chat: ChatConfig = ChatConfig()
    eval: EvalConfig = EvalConfig()
    pairs: PairsConfig | None = None  # set: `run` starts with the pairs stage, and the data stage reads its pairs

    @model_validator(mode="after")
    def _data_source(self) -> Config:
        if self.pairs is not None and (self.data.path is not None or self.data.dataset is not None):
            raise ValueError("data.path / data.dataset: leave both unset when the config has a pairs section (the "
                             "data stage reads the pairs stage's pairs/pairs.jsonl)")
        if self.pairs is None and self.data.path is None and self.data.dataset is None:
            raise ValueError("data: set exactly one of data.path (a local file) or data.dataset (a hub dataset id), "
                             "or add a pairs section")
        return self

def _parse_value(text: str) -> Any:
    """`--set` values are YAML scalars: 1e-4, true, null, [a, b] all mean what they say."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> None:
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MedtuneError(f"--set {item!r}: expected section.key=value, e.g. --set train.lr=1e-4")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise MedtuneError(f"--set {item!r}: '{part}' is not a section")
        node[parts[-1]] = _parse_value(value)


def _resolve_paths(cfg: Config, root: Path) -> None:
    def resolve(p: Path) -> Path:
        return p if p.is_absolute() else (root / p).resolve()

    cfg.run_dir = resolve(cfg.run_dir)
    if cfg.data.path is not None:
        cfg.data.path = resolve(cfg.data.path)
    for bench in cfg.eval.benchmarks:
        bench.path = resolve(bench.path)
    if isinstance(cfg.export.imatrix, Path):
        cfg.export.imatrix = resolve(cfg.export.imatrix)
    base = cfg.base.model
    if base.startswith((".", "/")) and not base.startswith("pkg:"):
        cfg.base.model = str(resolve(Path(base)))
    template = cfg.base.chat_template
    if template is not None and chat_templates.is_file_spec(template):
        cfg.base.chat_template = str(resolve(Path(template)))
    if cfg.pairs is not None:
        cfg.pairs.questions = resolve(cfg.pairs.questions)
        if cfg.pairs.model is not None and cfg.pairs.model.startswith((".", "/")):
            cfg.pairs.model = str(resolve(Path(cfg.pairs.model)))


def _check_files(cfg: Config, source: str) -> None:
    if cfg.data.path is not None and not cfg.data.path.is_file():
        raise MedtuneError(f"{source}: data.path: file not found: {cfg.data.path}")
    for i, bench in enumerate(cfg.eval.benchmarks):
        if not bench.path.is_file():
            raise MedtuneError(f"{source}: eval.benchmarks[{i}].path: file not found: {bench.path}")
    if isinstance(cfg.export.imatrix, Path) and not cfg.export.imatrix.is_file():
        raise MedtuneError(f"{source}: export.imatrix: file not found: {cfg.export.imatrix} (use on, off or the path "
                           "of an imatrix file)")
    base = cfg.base.model
    if base.startswith("/") and not Path(base).exists():
        raise MedtuneError(f"{source}: base.model: path not found: {base}")
    if cfg.base.chat_template is not None:
        try:
            chat_templates.resolve(cfg.base.chat_template)
        except MedtuneError as exc:
            raise MedtuneError(f"{source}: {exc}") from None
    if cfg.pairs is not None and not cfg.pairs.questions.exists():
        raise MedtuneError(f"{source}: pairs.questions: file not found: {cfg.pairs.questions}")


def _format_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if p != "__root__") or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"{source}: {loc}: unknown key (check its spelling and section)"
    if first["type"] == "missing":
        return f"{source}: {loc}: required key is missing"
    msg = first["msg"].removeprefix("Value error, ")
    got = first.get("input")
    got_text = "" if isinstance(got, dict) or first["type"].startswith("value_error") else f", got {got!r}"
    more = f" (and {len(err.errors()) - 1} more problem(s))" if len(err.errors()) > 1 else ""
    if not first["loc"]:  # a check across sections names its keys itself
        return f"{source}: {msg}{got_text}{more}"
    return f"{source}: {loc}: {msg}{got_text}{more}"


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read, override, validate and resolve a run config; every problem is one MedtuneError line."""
    path = Path(path)
    if not path.is_file():
        raise MedtuneError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise MedtuneError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    except UnicodeDecodeError:
        raise MedtuneError(f"{path}: not UTF-8 text") from None
    if not isinstance(raw, dict):
        raise MedtuneError(f"{path}: expected a mapping of sections (base, data, train, ...) at the top level")
    apply_overrides(raw, overrides or [])
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as err:
        raise MedtuneError(_format_error(str(path), err)) from None
    _resolve_paths(cfg, path.resolve().parent)
    _check_files(cfg, str(path))
    return cfg
