"""The pairs stage: preference pairs from a model's own sampled replies, graded by the questions' answer keys.

For each multiple-choice question with a key, `samples` replies are sampled from `pairs.model`; each is graded by
the option letter `medtune.answers.extract_letter` reads from it. A question with right and wrong replies gives up
to `max_pairs_per_question` pairs, chosen = a right reply, rejected = a wrong one (another letter, or no letter
found): the recipe of Iterative Reasoning Preference Optimization (Pang et al. 2024). A question whose replies are
all right or all wrong gives none, unless `include_reference` lets its record's own reasoning be the chosen reply
(only when that reasoning itself ends in the right answer). Questions of the run's evaluation sets are refused
before anything is sampled.

With `pairs.balance_letters` (the default) each question is asked under one option permutation (the swap of
`medtune.formats.relabel`, seeded by the run's seed), chosen so that the sampled questions' gold letters are uniform
per option count; its chosen and rejected replies are both sampled under it, and its reference reasoning is
re-lettered with it (a question whose reasoning can't be re-lettered unambiguously keeps its letters, and is
counted). PubMedQA's yes/no/maybe are labels and never move. Which questions give pairs depends on the model's
answers, so the report shows the gold, chosen and rejected letter shares of the pairs made.

Output: `pairs.jsonl` in TRL's conversational shape, `samples.jsonl` (every reply with its grade) and
`report.json`. Questions are sampled in fixed groups (as many as fill one generate call); each group is seeded from
the run's seed and its first question's index, and its replies are appended and fsynced to a work file outside the
stage's folder (`<run>/.pairs-work/<key>/`). A rerun keeps the complete groups and samples only the rest, so a
killed run gives the same pairs as one that never stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from medtune.answers import extract_letter, question_options
from medtune.artifacts import RunDir, atomic_write_json, atomic_write_text, fingerprint, sha256_file
from medtune.config import Config, PairsConfig
from medtune.contamination import guard_for, question_stem
from medtune.errors import MedtuneError
from medtune.formats.benchmarks import load_benchmark
from medtune.formats.choice import BadItem, Item, pubmedqa_item, question_prompt, reasonmed_record
from medtune.formats.files import iter_raw_records
from medtune.formats.relabel import Balancer, LetterStats, balance_one, read, shares
from medtune.sampling import context_size
from medtune.ui import UI

GPU_BATCH, CPU_BATCH = 64, 8  # replies per generate call when pairs.batch_size is unset (CPU: see README)
REFUSED_SHOWN = 20  # refused questions listed by name in the report; all are counted

Messages = list[dict[str, str]]
# (conversations, replies per conversation, seed) -> replies per conversation; a reply is its text or a dict with
# "text" and optionally "finish_reason" ("stop" | "length")
Sampler = Callable[[list[Messages], int, int], list[list[Any]]]


@dataclass(frozen=True)
class Question:
    index: int  # position among the file's questions (0-based)
    id: str
    prompt: str  # the user turn, in the training data's multiple-choice format
    stem: str  # what the contamination guard compares: the question without preamble and options
    options: dict[str, str]
    answer: str  # the correct letter
    reference: str | None = None  # the record's own reasoning ending in its answer (ReasonMed `output`)


def _records(path: Path) -> Iterator[tuple[str, str, Any]]:
    """(location, key, record) of any file medtune.formats reads; a record that is not JSON is an error."""
    for raw in iter_raw_records(path):
        if raw.error:
            raise MedtuneError(f"{raw.location}: {raw.error.replace('|', ': ', 1)}")
        yield raw.location, raw.key, raw.value


def _from_item(index: int, item: Item) -> Question:
    # an explanation becomes a reply the way multiple-choice training records are made: it, then "The answer is X."
    reference = reasonmed_record(item)["output"] if item.explanation else None
    return Question(index, item.id, question_prompt(item), item.question, dict(item.options), item.answer, reference)


def load_questions(pc: PairsConfig) -> tuple[list[Question], dict[str, Any]]:
    """The file's questions with answer keys, and what was left out: {"no_answer_key": n, "examples": [...]}.

    PubMedQA: every PQA-L record of the file (the 500 official test ids are refused when PubMedQA is one of the
    run's evaluation sets); MedQA, MedMCQA and MMLU through the benchmark loaders; ReasonMed records whose output
    names a final answer among the instruction's lettered options.
    """
    skipped: dict[str, Any] = {"no_answer_key": 0, "examples": []}
    if pc.kind == "pubmedqa":
        items = []
        for where, key, record in _records(pc.questions):
            if not isinstance(record, dict):
                raise MedtuneError(f"{where}: expected a PubMedQA PQA-L record (pairs.kind is pubmedqa)")
            try:
                items.append(pubmedqa_item(record, key))
            except BadItem as bad:
                raise MedtuneError(f"{where}: {bad.message} (pairs.kind is pubmedqa)") from None
        return [_from_item(i, item) for i, item in enumerate(items)], skipped
    if pc.kind != "reasonmed":
        try:
            items = load_benchmark(pc.kind, pc.questions)
        except MedtuneError as exc:
            raise MedtuneError(f"{exc} (pairs.kind is {pc.kind})") from None
        return [_from_item(i, item) for i, item in enumerate(items)], skipped
    questions = []
    for index, (where, key, record) in enumerate(_records(pc.questions)):
        if not isinstance(record, dict) or not isinstance(record.get("instruction"), str) \
                or not isinstance(record.get("output"), str):
            raise MedtuneError(f"{where}: expected a ReasonMed record with string fields 'instruction' and 'output' "
                               f"(pairs.kind is reasonmed)")
        instruction, extra = record["instruction"].strip(), record.get("input") or ""
        prompt = f"{instruction}\n\n{extra.strip()}" if isinstance(extra, str) and extra.strip() else instruction
        options = question_options(instruction)
        answer = extract_letter(record["output"], options) if options else None
        if answer is None:  # no lettered options, or an output without a final answer: nothing to grade against
            skipped["no_answer_key"] += 1
            if len(skipped["examples"]) < REFUSED_SHOWN:
                skipped["examples"].append(where)
            continue
        questions.append(Question(index, str(record.get("id", key)), prompt, question_stem(instruction), options,
                                  answer, record["output"].strip()))
    if not questions:
        raise MedtuneError(f"{pc.questions}: no record has lettered options and an output ending in a final answer "
                           "(pairs.kind reasonmed)")
    return questions, skipped


def balance_questions(questions: list[Question], seed: int) -> tuple[list[Question], LetterStats]:
    """Each question with its options permuted so that the gold letters come out uniform per option count (seeded),
    its reference reply re-lettered with it; a question that can't be re-lettered is kept as it is and counted."""
    balancer, stats = Balancer(seed), LetterStats()
    out = []
    for q in questions:
        reply = q.reference or f"The answer is {q.answer}."  # the key, where the question has no reasoning of its own
        prompt, new_reply = balance_one(q.prompt, reply, balancer, stats, q.id)
        if prompt == q.prompt:
            out.append(q)
            continue
        moved = read(prompt, new_reply)
        out.append(replace(q, prompt=prompt, options=moved.options, answer=moved.gold,
                           reference=new_reply if q.reference is not None else None))
    return out, stats


def grade(question: Question, reply: Any, sample: int) -> dict[str, Any]:
    """One sampled reply as written to samples.jsonl: its text, the letter read from it, and whether it is right."""
    text, finish = (reply, None) if isinstance(reply, str) else (reply["text"], reply.get("finish_reason"))
    letter = extract_letter(text, question.options)
    return {"index": question.index, "id": question.id, "sample": sample, "text": text, "finish_reason": finish,
            "answer": letter, "correct": letter == question.answer}


def make_pairs(question: Question, samples: list[dict[str, Any]], cap: int,
               include_reference: bool) -> tuple[list[dict[str, Any]], str | None]:
    """Up to `cap` (chosen, rejected) pairs of one question, and why it gave none ("all_right" / "all_wrong").

    Chosen replies are the right samples (after the reference, when used); rejected ones the wrong samples; both
    without repeated texts. The k-th pair is (chosen k mod C, rejected (k + t) mod R) in round t of lcm(C, R)
    pairs: the first max(C, R) pairs use every reply, and no (chosen, rejected) pair comes twice.
    """
    chosen: list[tuple[str, str | None]] = []
    if include_reference and question.reference \
            and extract_letter(question.reference, question.options) == question.answer:
        chosen.append((question.reference, question.answer))
    rejected: list[tuple[str, str | None]] = []
    for s in samples:
        bucket = chosen if s["correct"] else rejected
        if all(s["text"] != text for text, _ in bucket):
            bucket.append((s["text"], s["answer"]))
    if not rejected:
        return [], "all_right"
    if not chosen:
        return [], "all_wrong"
    n_c, n_r = len(chosen), len(rejected)
    order = [(k % n_c, (k + t) % n_r) for t in range(math.gcd(n_c, n_r)) for k in range(math.lcm(n_c, n_r))]
    pairs = []
    for k, (c, r) in enumerate(order[:cap]):
        pairs.append({
            "id": f"{question.id}:{k}",
            "prompt": [{"role": "user", "content": question.prompt}],
            "chosen": [{"role": "assistant", "content": chosen[c][0]}],
            "rejected": [{"role": "assistant", "content": rejected[r][0]}],
            "answer": question.answer, "chosen_answer": chosen[c][1], "rejected_answer": rejected[r][1],
        })
    return pairs, None


def group_seed(seed: int, first_index: int, chunk: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{first_index}:{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # torch.manual_seed takes a non-negative 63-bit value


class HFSampler:
    """Sampled chat replies from a Transformers model: prompts left-padded into one batch, each repeated n times,
    every row stopping at the model's end-of-turn ids. `torch.manual_seed(seed)` before each call, because
    `generate` draws from the global generator."""

    def __init__(self, model: str, temperature: float, top_p: float, max_new_tokens: int,
                 device: str | None = None) -> None:
        from medtune.models import end_of_turn_ids, ensure_pad_token, load_hf

        self.model, self.tokenizer = load_hf(model, device=device)
        ensure_pad_token(self.tokenizer)
        self.stop_ids = end_of_turn_ids(self.model, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id
        self.n_ctx = context_size(self.model.config)
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens

    def __call__(self, conversations: list[Messages], n: int, seed: int) -> list[list[dict[str, Any]]]:
        import torch

        from medtune.models import chat_prompt_ids

        prompts = [chat_prompt_ids(self.tokenizer, m) for m in conversations]
        width = max(len(p) for p in prompts)
        if width >= self.n_ctx:
            raise MedtuneError(f"pairs: a prompt of {width} tokens does not fit the model's context of {self.n_ctx} "
                               "tokens; leave such questions out of pairs.questions")
        rows = [p for p in prompts for _ in range(n)]
        device = self.model.device
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in rows], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows], device=device)
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=min(self.max_new_tokens, self.n_ctx - width),
                do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=0,
                eos_token_id=self.stop_ids, pad_token_id=self.pad_id)
        replies: list[list[dict[str, Any]]] = [[] for _ in conversations]
        for i, row in enumerate(out[:, width:].tolist()):
            stop = next((j for j, token in enumerate(row) if token in self.stop_ids), None)
            new = row if stop is None else row[:stop]
            replies[i // n].append({"text": self.tokenizer.decode(new, skip_special_tokens=True).strip(),
                                    "finish_reason": "length" if stop is None else "stop"})
        return replies


def _groups(questions: list[Question], k: int, batch: int) -> list[list[Question]]:
    """Questions in fixed groups of one generate call each (a question's k replies never split across groups)."""
    size = max(1, batch // k)
    return [questions[i:i + size] for i in range(0, len(questions), size)]


def _read_work(path: Path, groups: list[list[Question]], k: int) -> dict[int, list[dict[str, Any]]]:
    """Samples of the groups a killed run completed, by question index; a torn or partial group is dropped and the
    file rewritten without it, so appending goes on from a clean end."""
    if not path.is_file():
        return {}
    by_index: dict[int, list[dict[str, Any]]] = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break  # the line a kill cut short, and nothing after it
            by_index.setdefault(record["index"], []).append(record)
    kept: dict[int, list[dict[str, Any]]] = {}
    for group in groups:
        if all(len(by_index.get(q.index, [])) == k for q in group):
            kept.update({q.index: by_index[q.index] for q in group})
    if sum(map(len, kept.values())) != sum(map(len, by_index.values())) or not _ends_cleanly(path):
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                        for index in sorted(kept) for r in kept[index]))
    return kept


def _ends_cleanly(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        if fh.tell() == 0:
            return True
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


def _batch_size(pc: PairsConfig) -> int:
    if pc.batch_size is not None:
        return pc.batch_size
    import torch

    return GPU_BATCH if torch.cuda.is_available() else CPU_BATCH


def _model_spec(cfg: Config) -> str:
    """The sampling model as `from_pretrained` takes it; a missing local folder is named with the fix."""
    from medtune.models import resolve_base

    spec = cfg.pairs.model or cfg.base.model
    field = "pairs.model" if cfg.pairs.model else "base.model"
    if spec.startswith("/") and not Path(spec).exists():
        raise MedtuneError(f"{field}: {spec} not found; run the merge of the run it belongs to first, or point "
                           f"{field} at an existing model folder")
    return resolve_base(spec, cfg.base.revision if not cfg.pairs.model else None)


def _work_key(cfg: Config, questions: list[Question], batch: int) -> str:
    """What decides the samples: model, questions, sampling settings, groups. The pair cap and include_reference
    are not in it, so changing them reuses the samples."""
    pc = cfg.pairs
    model = Path(pc.model or cfg.base.model)
    manifest = model / "manifest.json"
    return fingerprint({
        "model": pc.model or cfg.base.model, "revision": None if pc.model else cfg.base.revision,
        "model_manifest": sha256_file(manifest) if manifest.is_file() else None,
        "questions": sha256_file(pc.questions) if pc.questions.is_file() else str(pc.questions),
        "kind": pc.kind, "sampled": [q.index for q in questions], "samples": pc.samples,
        "balance_letters": pc.balance_letters,
        "temperature": pc.temperature, "top_p": pc.top_p, "max_new_tokens": pc.max_new_tokens, "batch": batch,
        "seed": cfg.seed,
    })


def _outside_evaluation(questions: list[Question], guard: Any, limit: int | None
                        ) -> tuple[list[Question], list[dict[str, Any]]]:
    """The questions to sample (at most `limit`) and those refused as matching an evaluation question."""
    refused: list[dict[str, Any]] = []
    kept: list[Question] = []
    for q in questions:
        matches = guard.check(q.stem) if guard is not None else []
        if matches:
            refused.append({"index": q.index, "id": q.id, "matches": [
                {"benchmark": m.benchmark, "item": m.item_id, "kind": m.kind, "score": m.score} for m in matches]})
        elif limit is None or len(kept) < limit:
            kept.append(q)
    return kept, refused


def _sample_group(group: list[Question], sampler: Sampler, k: int, batch: int, seed: int,
                  done: dict[int, list[dict[str, Any]]], fh: Any) -> None:
    """`k` graded replies to each question of `group`, into `done` and appended (synced) to the work file."""
    conversations = [[{"role": "user", "content": q.prompt}] for q in group]
    replies: list[list[Any]] = [[] for _ in group]
    for chunk, start in enumerate(range(0, k, batch)):  # k > batch: one question over several calls
        n = min(batch, k - start)
        for i, got in enumerate(sampler(conversations, n, group_seed(seed, group[0].index, chunk))):
            replies[i] += got[:n]
    lines = []
    for q, got in zip(group, replies):
        if len(got) != k:
            raise MedtuneError(f"pairs: the sampler gave {len(got)} replies to question {q.id}, not {k}")
        done[q.index] = [grade(q, reply, j) for j, reply in enumerate(got)]
        lines += [json.dumps(r, ensure_ascii=False) + "\n" for r in done[q.index]]
    fh.write("".join(lines))
    fh.flush()
    os.fsync(fh.fileno())


def _pair_all(kept: list[Question], done: dict[int, list[dict[str, Any]]], pc: PairsConfig
              ) -> tuple[list[dict[str, Any]], dict[str, int], int]:
    """Every question's pairs, how many questions gave none (all right, all wrong), and how many used the reference."""
    pairs: list[dict[str, Any]] = []
    skipped = {"all_right": 0, "all_wrong": 0}
    with_reference = 0
    for q in kept:
        made, reason = make_pairs(q, done[q.index], pc.max_pairs_per_question, pc.include_reference)
        if reason:
            skipped[reason] += 1
        with_reference += any(p["chosen"][0]["content"] == q.reference for p in made)
        pairs += made
    return pairs, skipped, with_reference


def run(cfg: Config, run_dir: RunDir, out: Path, ui: UI, sampler: Sampler | None = None) -> dict[str, Any]:
    """Sample, grade and pair; `sampler` replaces the HF model (tests)."""
    pc = cfg.pairs
    if pc is None:
        raise MedtuneError("pairs: the config has no pairs section; add one (questions, kind, model, samples) to "
                           "make preference pairs")
    started = time.monotonic()
    questions, unusable = load_questions(pc)
    kept, refused = _outside_evaluation(questions, guard_for(cfg.eval.benchmarks), pc.limit)
    if refused:
        ui.log(f"pairs: refused {len(refused)} of {len(questions)} questions found in the run's evaluation sets")
    if not kept:
        raise MedtuneError(f"{pc.questions}: every question is in the run's evaluation sets "
                           f"({', '.join(b.name for b in cfg.eval.benchmarks)}); sample from training questions")

    letters = LetterStats()
    balancing = pc.balance_letters and pc.kind != "pubmedqa"  # PubMedQA's yes/no/maybe are labels, not options
    if balancing:
        kept, letters = balance_questions(kept, cfg.seed)
    k, batch = pc.samples, _batch_size(pc)
    groups = _groups(kept, k, batch)
    work = run_dir / ".pairs-work" / _work_key(cfg, kept, batch)
    work.mkdir(parents=True, exist_ok=True)
    done = _read_work(work / "samples.jsonl", groups, k)
    if done:
        ui.log(f"pairs: resuming; {len(done)} of {len(kept)} questions already sampled")
    task = ui.task("pairs: sampling", total=len(kept))
    ui.update(task, completed=len(done))
    todo = [g for g in groups if g[0].index not in done]
    if todo and sampler is None:
        sampler = HFSampler(_model_spec(cfg), pc.temperature, pc.top_p, pc.max_new_tokens)
    with open(work / "samples.jsonl", "a", encoding="utf-8") as fh:
        for group in todo:
            _sample_group(group, sampler, k, batch, cfg.seed, done, fh)
            ui.update(task, advance=len(group))

    pairs, skipped, with_reference = _pair_all(kept, done, pc)
    samples = [s for q in kept for s in done[q.index]]
    _write_jsonl(out / "pairs.jsonl", pairs)
    _write_jsonl(out / "samples.jsonl", samples)
    n = len(samples)
    correct = sum(s["correct"] for s in samples)
    failures = sum(s["answer"] is None for s in samples)
    report = {
        "questions": len(questions) + unusable["no_answer_key"],
        "no_answer_key": unusable["no_answer_key"],
        "refused_contamination": len(refused),
        "sampled_questions": len(kept),
        "samples": n,
        "samples_per_question": k,
        "sampled_accuracy": round(correct / n, 4),
        "extraction_failures": failures,
        "extraction_failure_rate": round(failures / n, 4),
        "cut_at_max_new_tokens": sum(s["finish_reason"] == "length" for s in samples),
        "pairs": len(pairs),
        "questions_with_pairs": len(kept) - sum(skipped.values()),
        "questions_skipped": skipped,
        "questions_with_reference_pair": with_reference,
        "resumed_questions": len(kept) - sum(len(g) for g in todo),
        "model": pc.model or cfg.base.model,
        "seconds": round(time.monotonic() - started, 1),
        "letters": {"questions": letters.report(balancing),
                    **pair_letter_shares(pairs)},
    }
    atomic_write_json(out / "report.json", {
        **report, "refused": refused[:REFUSED_SHOWN], "no_answer_key_examples": unusable["examples"]})
    for stale in (run_dir / ".pairs-work").iterdir():  # samples of other settings are not reused
        if stale != work:
            shutil.rmtree(stale, ignore_errors=True)
    ui.log(f"pairs: {len(pairs)} pairs from {report['questions_with_pairs']} of {len(kept)} questions; sampled "
           f"accuracy {report['sampled_accuracy']:.1%}, no answer found in {report['extraction_failure_rate']:.1%}; "
           f"skipped {skipped['all_right']} all right, {skipped['all_wrong']} all wrong; refused "
           f"{len(refused)} (evaluation sets)")
    if balancing:
        ui.log(f"pairs: balance_letters: questions' {letters.summary()}; pairs' gold letters "
               f"{report['letters']['pairs_answer_shares']}")
    return report


def pair_letter_shares(pairs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Shares of the pairs' gold letters and of the letters their chosen and rejected replies give ("none": no
    letter found in the reply)."""
    return {f"pairs_{field}_shares": shares(Counter(p[field] or "none" for p in pairs))
            for field in ("answer", "chosen_answer", "rejected_answer")}


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
