"""Does a GGUF file behave like the HF model it came from? Tokenizer, logits, perplexity and one chat answer.

`python -m medtune.export.parity SPEC_JSON` checks one file and prints one JSON line; the export runs it in a child
process per file, so a llama.cpp build that crashes on this CPU is reported instead of taking the export down.

- tokenizer: llama.cpp's tokenizer (`special=True`, no BOS) and the HF tokenizer (`add_special_tokens=False`) give
  identical ids on every text of `parity_texts()` (medical prose, unicode, special tokens, whitespace runs, digits,
  code, chat-rendered conversations);
- logits (the F16/BF16 file only): llama.cpp with all logits vs transformers in float32 on the same ids (the
  held-out text and packed parity texts, LOGIT_POSITIONS positions); top-1 next-token agreement over every position
  and the max |logit difference|;
- perplexity on `HELD_OUT`, a medical text written for this check (it is in no training set), so each quant can be
  compared with the F16 file;
- runtime: one greedy chat answer through the file's own chat template, which must be non-empty (and, normally,
  end at the end-of-turn token); `stop_probe`, a second answer (STOP_PROBE) that must end too; `after_answer`: right
  after a finished answer to it (FINISHED_ANSWER) the file must end its turn within AFTER_ANSWER_TOKENS.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from typing import Any

from medtune.chat_formats import ALL_MARKERS, STOP_TOKENS

MIN_PARITY_TEXTS = 200
PACK_WIDTH = 256  # ids per sequence in the logit comparison
LOGIT_POSITIONS = 1024  # positions compared
MAX_SPECIALS = 24  # a Llama 3 tokenizer has 256 reserved specials; a sample of them tells as much as all

MEDICAL = (
    "A 54-year-old man presents with crushing substernal chest pain radiating to the left arm.",
    "Metformin 500 mg PO BID was started; HbA1c fell from 8.9% to 7.1% over 3 months.",
    "The ECG shows ST-segment elevation in leads II, III and aVF, suggesting an inferior STEMI.",
    "Patient is afebrile, BP 132/84 mmHg, HR 96 bpm, SpO2 94% on room air.",
    "Differential diagnosis: community-acquired pneumonia vs. pulmonary embolism vs. CHF exacerbation.",
    "Start IV ceftriaxone 1 g q24h plus azithromycin 500 mg on day 1, then 250 mg daily.",
    "Serum sodium 128 mEq/L, potassium 5.9 mEq/L, creatinine 2.4 mg/dL (baseline 1.1).",
    "Hypothyroidism presents with fatigue, weight gain, cold intolerance and constipation.",
    "Which vitamin deficiency causes scurvy? A. Vitamin A B. Vitamin B12 C. Vitamin C D. Vitamin D",
    "Please answer the following multiple-choice question:\nWhich organ produces insulin?",
    "The answer is C.",
    "Rule out DKA: check glucose, ketones, anion gap and venous pH.",
    "Warfarin interacts with amiodarone, fluconazole and metronidazole, raising the INR.",
    "Acetaminophen overdose is treated with N-acetylcysteine, ideally within 8 hours of ingestion.",
    "The CHA2DS2-VASc score guides anticoagulation in non-valvular atrial fibrillation.",
    "Beta-blockers are contraindicated in acute decompensated heart failure with cardiogenic shock.",
    "Tuberculosis: Ziehl-Neelsen stain shows acid-fast bacilli; treat with RIPE for 2 months, then RI for 4.",
    "Kawasaki disease: fever >= 5 days, conjunctivitis, strawberry tongue, rash, cervical lymphadenopathy.",
    "Pregnant patient, G2P1, 32 weeks' gestation, with BP 162/110 and proteinuria 3+.",
    "CSF: opening pressure 32 cmH2O, WBC 1,200/uL (90% neutrophils), glucose 18 mg/dL, protein 210 mg/dL.",
    "Lithium toxicity causes coarse tremor, ataxia, confusion and nephrogenic diabetes insipidus.",
    "Give 0.3 mg IM epinephrine (1:1000) into the anterolateral thigh for anaphylaxis.",
    "HIV post-exposure prophylaxis should begin within 72 hours: tenofovir/emtricitabine + dolutegravir.",
    "The most common cause of Cushing syndrome is exogenous glucocorticoid use.",
    "MRI brain w/o contrast: T2/FLAIR hyperintensities in the periventricular white matter.",
    "Hgb 7.2 g/dL, MCV 68 fL, ferritin 6 ng/mL: iron-deficiency anemia; look for GI blood loss.",
    "Step 1: identify the key findings. Step 2: consider each option. Step 3: choose the best answer.",
    "Pneumothorax > 2 cm at the hilum in a symptomatic patient warrants needle aspiration or a chest drain.",
    "Ondansetron prolongs the QT interval; monitor with ECG when combined with other QT-prolonging drugs.",
    "Sepsis bundle: lactate, blood cultures before antibiotics, 30 mL/kg crystalloid for hypotension.",
    "In children, dose amoxicillin at 80-90 mg/kg/day divided twice daily for acute otitis media.",
    "Hashimoto's thyroiditis: anti-TPO antibodies positive, diffuse non-tender goiter.",
    "eGFR < 30 mL/min/1.73m^2: avoid metformin; adjust gabapentin and enoxaparin doses.",
    "Glasgow Coma Scale E2V3M5 = 10 after a fall from 3 metres.",
    "A 6-week-old infant with projectile non-bilious vomiting and an olive-shaped epigastric mass.",
    "Summary: the findings are most consistent with primary biliary cholangitis (AMA-positive).",
    "Contraindications to tPA include recent surgery (< 14 days), prior ICH and platelets < 100,000/mm3.",
    "Vaccines: MMR and varicella are live attenuated and contraindicated in pregnancy.",
    "The patient's K+ was 6.8 -> calcium gluconate 10%, insulin 10 U + D50, then salbutamol nebulizer.",
    "Lyme disease (Borrelia burgdorferi) is transmitted by Ixodes ticks; erythema migrans appears first.",
)
UNICODE = (
    "Le patient présente une fièvre à 39,5 °C et une céphalée depuis hier.",
    "Der Patient klagt über Übelkeit, Schwindel und Schmerzen im Brustkorb (seit 2 Std.).",
    "La paciente, de 67 años, refiere disnea y tos con expectoración; niño con otitis.",
    "Paciente com insuficiência cardíaca congestiva e edema nos membros inferiores.",
    "Pacjent zgłasza ból głowy, gorączkę i zawroty głowy; żółtaczka.",
    "İstanbul'da hastaya ılık kompres uygulandı; ağrı kesici verildi.",
    "Ο ασθενής έχει πυρετό και βήχα· β-αναστολείς, α-γλυκοσιδάση.",
    "Пациент жалуется на боль в груди и одышку; ЧСС 110 уд/мин.",
    "المريض يعاني من ارتفاع ضغط الدم والسكري من النوع الثاني.",
    "החולה מתלונן על כאבי בטן והקאות.",
    "रोगी को बुखार और खांसी है; रक्तचाप 140/90 है।",
    "ผู้ป่วยมีไข้สูงและปวดศีรษะ",
    "糖尿病患者的血糖控制目标为空腹血糖 4.4–7.0 mmol/L。",
    "患者は胸痛と呼吸困難を訴えている。心電図でST上昇を認める。",
    "환자는 두통과 발열을 호소합니다. 혈압은 150/95 mmHg입니다.",
    "Tiếng Việt: bệnh nhân bị sốt xuất huyết Dengue.",
    "Emoji: 💊🩺🧬🫀🫁 ❤️‍🩹 👩🏽‍⚕️ 👨‍👩‍👧 🇫🇷🇯🇵 ✅❌⚠️",
    "Combining marks: cafe\u0301, nai\u0308ve, Ångström vs A\u030angstro\u0308m.",
    "Zero width: a\u200bb\u200cc\u200dd and a no\u2011break\u00a0space and a soft\u00adhyphen.",
    "Maths: ≤ ≥ ± × ÷ √ ∞ ≈ ≠ µg/kg ½ ¼ ‰ ℃ Ω → ↔ ⇒ ∑ ∫ ∂ ∇",
    "Full width: ＡＢＣ１２３ ＭＧ／ＫＧ，（注意）",
    "Quotes and dashes: “double” ‘single’ «guillemets» — em – en … ellipsis",
    "Currency: €12,50 £9.99 ¥1,000 ₹500 ₩10,000 ₿0.01",
    "Subscripts: H₂O, CO₂, Na⁺, Cl⁻, Ca²⁺, x² + y³",
    "Latin abbreviations: i.e., e.g., et al., q.i.d., p.r.n., a.c., h.s.",
    "Mixed scripts: insulin インスリン 胰岛素 인슐린 инсулин ινσουλίνη",
    "Control chars: tab\there, bell-free, form\x0cfeed, vertical\x0btab.",
    "Surrogates outside the BMP: 𝛼 𝛽 𝐀 𝔸 𝟙 🜁 𓂀",
    "Lone accents: ´ ` ¨ ˆ ˜ and spacing modifiers ʼ ʻ ˈ ˌ",
    "Arabic digits ٠١٢٣٤٥٦٧٨٩ and Devanagari digits ०१२३४५६७८९",
)
WHITESPACE = (
    "two  spaces", "three   spaces", "eight        spaces", "sixteen                spaces",
    " leading space", "   leading spaces", "trailing space ", "trailing spaces   ",
    "tab\tseparated\tvalues", "double\t\ttab", "line\nbreak", "two\n\nbreaks", "three\n\n\nbreaks",
    "windows\r\nline\r\nend", "mixed \t \n \r\n whitespace", "\n\nleading newlines", "trailing newlines\n\n\n",
    "    def indented():\n        return 1\n", "a\n b\n  c\n   d", "   ", "\n", "\t", " \n \n ",
    "word\u3000ideographic\u3000space",
)
DIGITS = (
    "0", "7", "42", "123", "1234", "12345", "1234567890", "3.14159265", "0.0001 mg/kg", "120/80 mmHg",
    "1,000,000 units", "1e-6 M", "-273.15 °C", "2024-01-31T23:59:59Z", "+1 (555) 010-9999", "99.9th percentile",
    "v1.2.3-rc4", "0x1F 0b1011 0o17", "ICD-10 E11.9, I21.4, J18.9", "1/2 + 3/4 = 5/4",
)
CODE = (
    "def bmi(weight_kg: float, height_m: float) -> float:\n    return weight_kg / height_m ** 2\n",
    '{"patient_id": 1042, "dx": ["I10", "E11.9"], "allergies": null, "active": true}',
    "<div class=\"vitals\"><span id='bp'>120/80</span></div>",
    "SELECT name, dob FROM patients WHERE age >= 65 AND dx LIKE 'E11%';",
    "for (int i = 0; i < n; ++i) { dose[i] *= 0.5; }  // halve every dose",
    "re.compile(r'^(?P<drug>[A-Za-z]+)\\s+(?P<mg>\\d+)\\s*mg$')",
    "$ pip install medtune && medtune run configs/demo.yaml --set train.lr=1e-4",
    "| drug | dose |\n|---|---:|\n| aspirin | 81 mg |",
    "```python\nprint('hello')\n```",
    "#include <stdio.h>\nint main(void) { return 0; }",
    "x = [i**2 for i in range(10) if i % 2 == 0]",
    "fn main() { println!(\"{}\", 1 + 1); }",
    "<?xml version=\"1.0\"?><note><to>Dr. Who</to></note>",
    "git commit -m \"fix: don't double-count doses\"",
    "a+b=c; a-b=d; a*b=e; a/b=f; a%b=g; a^b=h; a&&b||!c",
)
CONVERSATIONS = (
    [{"role": "user", "content": "Which vitamin deficiency causes scurvy?"}],
    [{"role": "system", "content": "You are a careful medical assistant."},
     {"role": "user", "content": "What is the first-line drug for type 2 diabetes?"},
     {"role": "assistant", "content": "Metformin, unless contraindicated.\nThe answer is metformin."},
     {"role": "user", "content": "And its main side effect?"}],
    [{"role": "user", "content": "Résumé en français : fièvre, toux 🤒"},
     {"role": "assistant", "content": "  Fièvre et toux.  "}],
)

# A second answer every file must end: the architecture matrix's chat question, on which Gemma 3's plain Q4_K_M file
# looped while it ended its answer to the config's check prompt (BENCHMARKS.md, "A second architecture").
STOP_PROBE = ("Please answer the following multiple-choice question:\nWhich organ produces insulin?\n"
              "A. Liver\nB. Pancreas\nC. Kidney\nD. Spleen")
# A finished answer to it in the shape the data readers write (rationale, then the answer line): right after it the
# file must end its turn. A file whose learned stop is thin repeats itself here (the demo's Q5_K_M file did).
FINISHED_ANSWER = "The pancreas produces insulin, which lowers blood glucose.\nThe answer is B."
AFTER_ANSWER_TOKENS = 16

# Held-out text for perplexity: written for this check, in no training set; a few hundred tokens of clinical prose.
HELD_OUT = """\
Community-acquired pneumonia remains one of the most common reasons for hospital admission in adults. The \
diagnosis rests on a compatible clinical picture, such as fever, cough, pleuritic chest pain and shortness of \
breath, together with a new infiltrate on chest radiography. Older patients may present atypically, with \
confusion, falls or a decline in function rather than with fever. Severity scores help to decide where a patient \
should be treated: a patient with low risk can usually take oral antibiotics at home, while confusion, a raised \
urea, a fast respiratory rate, low blood pressure and an age of sixty-five or more all point towards admission.

The choice of antibiotic depends on local resistance patterns, recent antibiotic use and the severity of illness. \
Amoxicillin is a reasonable first choice for mild disease in many regions; a macrolide or doxycycline covers \
atypical organisms such as Mycoplasma and Legionella. Patients admitted to hospital commonly receive a \
beta-lactam combined with a macrolide. Blood cultures and a sputum sample should be taken before the first dose \
whenever this does not delay treatment, because the first dose should be given within four hours of arrival.

Supportive care matters as much as the antibiotic. Oxygen is titrated to a target saturation, usually 94 to 98 \
percent, or 88 to 92 percent in patients at risk of hypercapnic respiratory failure. Fluids are given to patients \
who are dehydrated or hypotensive, and venous thromboembolism prophylaxis is considered for everyone admitted. \
Most patients improve within three days; failure to improve should prompt a search for complications such as a \
parapneumonic effusion, an empyema, a lung abscess or an alternative diagnosis, including pulmonary embolism, \
heart failure or malignancy. A follow-up chest radiograph after six weeks is advised for smokers and for patients \
over fifty, to make sure that an underlying tumour has not been missed.
"""


def specials_of(tokenizer: Any) -> list[str]:
    """The tokenizer's own special and added tokens (a sample when there are many), end-of-turn tokens first."""
    vocab = tokenizer.get_vocab()
    found = [t for t in STOP_TOKENS if t in vocab]
    found += [t for t in tokenizer.all_special_tokens if t not in found]
    found += [t for t in tokenizer.get_added_vocab() if t not in found]
    return found[:MAX_SPECIALS]


def parity_texts(specials: Sequence[str], chat: Any = None) -> list[str]:
    """At least 200 texts that find tokenizer differences; `chat(messages) -> str` adds chat-rendered ones.

    Deterministic: the same tokenizer always gets the same texts.
    """
    texts = [*MEDICAL, *UNICODE, *WHITESPACE, *DIGITS, *CODE]
    # every chat format's markers: those a tokenizer lacks must come out as plain text
    for token in [*specials, *(t for t in ALL_MARKERS if t not in specials)]:
        texts += [token, f"before{token}after", f" {token} ", f"{token}\n\nNext line", f"Q: why?{token}{token}"]
    if chat is not None:
        texts += [chat(messages) for messages in CONVERSATIONS]
    rng = random.Random(0)
    pools = (MEDICAL, UNICODE, WHITESPACE, DIGITS, CODE, tuple(specials) or ("",))
    while len(texts) < MIN_PARITY_TEXTS + 40:
        parts = [rng.choice(rng.choice(pools)) for _ in range(rng.randint(2, 4))]
        texts.append(rng.choice(("", " ", "\n", "  ", "\t")).join(parts))
    return [t for t in dict.fromkeys(texts) if t]


def perplexity(logits: Any, ids: Sequence[int]) -> float:
    """exp(mean negative log-likelihood) of ids[1:] given the logits at positions 0..n-2."""
    import numpy as np

    rows = np.asarray(logits[: len(ids) - 1], dtype=np.float32)
    top = rows.max(axis=-1)
    log_sum = top + np.log(np.exp(rows - top[:, None]).sum(axis=-1, dtype=np.float64))
    nll = log_sum - rows[np.arange(len(rows)), np.asarray(ids[1:])]
    return float(math.exp(nll.mean()))


class LlamaLogits:
    """All logits of a token sequence from llama.cpp, each sequence from an empty context."""

    def __init__(self, path: str, n_ctx: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=min(n_ctx, 512), logits_all=True,
                         n_threads=os.cpu_count(), verbose=False)

    def __call__(self, ids: Sequence[int]) -> Any:
        import numpy as np

        self.llm.reset()
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)


def _plain_parts_differ(vocab: Any, tokenizer: Any, text: str, specials: Sequence[str]) -> bool:
    """Whether a text holding special tokens differs on what matters: a special token, or an ASCII piece between
    them (both runtimes split the specials out first, so each piece tokenizes alone as it does in the text). A
    difference only inside a non-ASCII piece (HF's NFC normalization of combining marks, which llama.cpp skips) is
    the rare-unicode kind."""
    import re

    for piece in re.split("(" + "|".join(re.escape(t) for t in specials) + ")", text):
        if piece and (piece in specials or piece.isascii()):
            hf = tokenizer(piece, add_special_tokens=False)["input_ids"]
            if vocab.tokenize(piece.encode("utf-8"), add_bos=False, special=True) != hf:
                return True
    return False


def check_tokenizer(vocab: Any, tokenizer: Any, texts: Sequence[str], specials: Sequence[str]) -> dict[str, Any]:
    """Identical ids on every text; a difference on ASCII text or text with a special token is fatal.

    llama.cpp re-implements each pre-tokenizer's regex with its own unicode tables, and on some rare symbols (for
    SmolLM2: × ÷ and Arabic-Indic digits) it splits differently from HF. Those differences are recorded and shown,
    but only differences on what every prompt is made of (ASCII text, the chat format's special tokens) fail a file.
    So is a text where llama.cpp reads another family's marker as one control token (Qwen's vocabulary holds `</s>`
    as ordinary text; llama.cpp marks it as an end-of-generation token by its name) while agreeing with HF once
    markers are not parsed: recorded, not fatal.
    """
    mismatches = []
    hf_ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    for text, expected in zip(texts, hf_ids):
        got = vocab.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if got != expected:
            own_special = any(token in text for token in specials)
            fatal = text.isascii() or (own_special and _plain_parts_differ(vocab, tokenizer, text, specials))
            # llama.cpp marks vocabulary entries named like another family's markers (`</s>` is an ordinary token
            # of Qwen's vocabulary) as control tokens and parses them as such: not a difference in the BPE itself
            control_name = not own_special and vocab.tokenize(text.encode("utf-8"), add_bos=False,
                                                              special=False) == expected
            mismatches.append({"text": text, "fatal": fatal and not control_name, "hf": expected[:40],
                               "llama_cpp": got[:40], **({"why": "llama.cpp parses a foreign marker as a control "
                                                          "token"} if control_name else {})})
    fatal, rare = [m for m in mismatches if m["fatal"]], [m for m in mismatches if not m["fatal"]]
    return {"texts": len(texts), "tokens": sum(len(i) for i in hf_ids), "identical": len(texts) - len(mismatches),
            "mismatches": len(mismatches), "fatal_mismatches": len(fatal),
            "examples": fatal[:5] + rare[:3]}  # the rare kind too: the export's warning quotes one


def packed(rows: Sequence[Sequence[int]], width: int) -> list[list[int]]:
    """Consecutive texts joined into sequences of at most `width` ids: far fewer forward passes on a CPU."""
    out: list[list[int]] = [[]]
    for ids in rows:
        if out[-1] and len(out[-1]) + len(ids) > width:
            out.append([])
        out[-1].extend(ids[:width])
    return [ids for ids in out if ids]


def logit_sequences(tokenizer: Any, texts: Sequence[str], held_out: list[int]) -> list[list[int]]:
    """What the logit comparison runs on: the held-out text (its logits serve the perplexity too), then a fixed
    shuffle of the parity texts packed PACK_WIDTH ids a sequence, up to LOGIT_POSITIONS positions in all (enough to
    resolve 0.1% of agreement; every text would cost minutes on two cores)."""
    order = random.Random(1).sample(list(texts), len(texts))
    sequences = [held_out]
    for ids in packed(tokenizer(order, add_special_tokens=False)["input_ids"], PACK_WIDTH):
        if sum(map(len, sequences)) >= LOGIT_POSITIONS:
            break
        sequences.append(ids)
    return sequences


class LogitComparison:
    """Top-1 agreement and |logit difference| over every position of (llama.cpp, transformers) logit pairs."""

    def __init__(self) -> None:
        self.agree = self.positions = 0
        self.max_diff = self.total_diff = 0.0

    def add(self, got: Any, reference: Any) -> None:
        import numpy as np

        diff = np.abs(got - reference)
        self.max_diff = max(self.max_diff, float(diff.max()))
        self.total_diff += float(diff.mean(axis=-1, dtype=np.float64).sum())
        self.agree += int((got.argmax(-1) == reference.argmax(-1)).sum())
        self.positions += len(got)

    def summary(self) -> dict[str, Any]:
        n = max(1, self.positions)
        return {"positions": self.positions, "top1_agreement": round(self.agree / n, 5),
                "max_abs_logit_diff": round(self.max_diff, 5), "mean_abs_logit_diff": round(self.total_diff / n, 6)}


def check_file(spec: dict[str, Any]) -> dict[str, Any]:
    """Every parity check of one GGUF file; `spec`: gguf, hf_dir, logits (bool), prompt, max_tokens."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from medtune.engines import LlamaCppEngine

    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        seconds[name] = round(time.perf_counter() - clock, 2)
        clock = time.perf_counter()

    tokenizer = AutoTokenizer.from_pretrained(spec["hf_dir"])
    chat = None
    if tokenizer.chat_template:
        def chat(messages: list[dict[str, str]]) -> str:
            return tokenizer.apply_chat_template(messages, tokenize=False)
    specials = specials_of(tokenizer)
    texts = parity_texts(specials, chat)
    vocab = Llama(model_path=spec["gguf"], vocab_only=True, verbose=False)
    result: dict[str, Any] = {"tokenizer": check_tokenizer(vocab, tokenizer, texts, specials)}
    lap("tokenizer")

    # The chat answer first, then every llama.cpp pass, then transformers: the two runtimes' thread pools never
    # take turns, which on a busy two-core machine costs more than the work itself.
    engine = LlamaCppEngine(spec["gguf"], n_ctx=2048)
    result["runtime"] = engine.complete([{"role": "user", "content": spec["prompt"]}], temperature=0.0, top_p=1.0,
                                        max_tokens=spec["max_tokens"])
    result["stop_probe"] = engine.complete([{"role": "user", "content": STOP_PROBE}], temperature=0.0, top_p=1.0,
                                           max_tokens=spec["max_tokens"])
    if tokenizer.chat_template:
        finished = tokenizer.apply_chat_template([{"role": "user", "content": STOP_PROBE}], tokenize=False,
                                                 add_generation_prompt=True) + FINISHED_ANSWER
        after = engine.llm.create_completion(finished, temperature=0.0, max_tokens=AFTER_ANSWER_TOKENS)["choices"][0]
        result["after_answer"] = {"text": after["text"], "finish_reason": after["finish_reason"]}
    del engine
    lap("runtime")

    held_out = vocab.tokenize(HELD_OUT.encode("utf-8"), add_bos=True, special=False)
    sequences = logit_sequences(tokenizer, texts, held_out) if spec["logits"] else [held_out]
    llama = LlamaLogits(spec["gguf"], n_ctx=max(map(len, sequences)) + 16)
    got = [llama(ids) for ids in sequences]
    del llama
    result["perplexity"] = {"tokens": len(held_out), "value": round(perplexity(got[0], held_out), 4)}
    lap("perplexity")
    if spec["logits"]:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=torch.float32).eval()
        comparison = LogitComparison()
        for ids, logits in zip(sequences, got):  # one reference at a time: a 128k vocabulary makes them large
            with torch.inference_mode():
                reference = model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
            comparison.add(logits, reference)
            if ids is held_out:
                result["perplexity"]["hf"] = round(perplexity(reference, held_out), 4)
        result["logits"] = comparison.summary()
        lap("logits")
    result["check_seconds"] = seconds
    return result


if __name__ == "__main__":
    print(json.dumps(check_file(json.loads(sys.argv[1])), ensure_ascii=False))
