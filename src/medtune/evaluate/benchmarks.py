"""Loading medical multiple-choice benchmarks (MedQA, MedMCQA, PubMedQA, MMLU) into one item shape, and sampling them.

Shapes read:
- MedQA-USMLE JSONL (`question`, `options` {letter: text}, `answer_idx`): the MedQA and MedMCQA files of the
  medagents benchmark and the medreason eval sets.
- MedMCQA hub rows (`id`, `question`, `opa`..`opd`, `cop`), JSONL.
- PubMedQA PQA-L `ori_pqal.json` restricted to the official test PMIDs of `test_ground_truth.json`.
- MMLU as cais/mmlu ships it: hub rows (`question`, `subject`, `choices`, `answer` 0-3) as JSONL, or the original
  headerless CSVs (`anatomy_test.csv`: question, A, B, C, D, answer letter).
"""

from __future__ import annotations

import csv
import inspect
import json
import random
import string
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medtune.errors import MedtuneError

LETTERS = string.ascii_uppercase
PUBMEDQA_OPTIONS = {"A": "yes", "B": "no", "C": "maybe"}
MMLU_MEDICAL = ("anatomy", "clinical_knowledge", "college_biology", "college_medicine", "medical_genetics",
                "professional_medicine")


@dataclass(frozen=True)
class Item:
    id: str
    question: str
    options: dict[str, str]
    answer: str  # the correct letter
    context: str = ""  # passage the question is about (PubMedQA abstract); empty for exam questions
    subject: str = ""  # benchmark subject (MMLU subject, MedMCQA subject_name) where the source records one


def _read_jsonl(path: Path) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """Yield ("file:line", line number, object) for each non-blank line of a JSONL file."""
    with open(path, encoding="utf-8-sig") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MedtuneError(f"{where}: malformed JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise MedtuneError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield where, lineno, obj


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8-sig") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise MedtuneError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise MedtuneError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None


def _question(where: str, obj: dict[str, Any], key: str = "question") -> str:
    question = obj.get(key)
    if not isinstance(question, str) or not question.strip():
        raise MedtuneError(f"{where}: field {key!r} must be a non-empty string")
    return question.strip()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_multiple_choice(path: Path) -> list[Item]:
    """MedQA-shaped JSONL: `question`, `options` {letter: text}, `answer_idx`; id from `realidx`, `id` or the line."""
    items = []
    for where, lineno, obj in _read_jsonl(path):
        question, options, answer = _question(where, obj), obj.get("options"), obj.get("answer_idx")
        if not isinstance(options, dict) or len(options) < 2:
            raise MedtuneError(f"{where}: field 'options' must map letters to option texts")
        if not isinstance(answer, str) or answer not in options:
            raise MedtuneError(f"{where}: field 'answer_idx' {answer!r} is not one of the options {list(options)}")
        items.append(Item(str(obj.get("realidx", obj.get("id", lineno))), question,
                          {k: str(v) for k, v in options.items()}, answer))
    if not items:
        raise MedtuneError(f"{path}: no items")
    return items


def load_medmcqa_hub(path: Path, cop_base: int | None = None) -> list[Item]:
    """MedMCQA rows as on the hub (`id`, `question`, `opa`..`opd`, `cop`, optional `subject_name`), JSONL.

    `cop` is 0-3 in the hub dataset (openlifescienceai/medmcqa) and 1-4 in the original release's JSON. With
    `cop_base=None` the base is read from the data: a 0 anywhere means 0-based, a 4 anywhere means 1-based; a file
    with both is an error, and one with only 1-3 (possible in a small file) needs `cop_base` given.
    """
    if cop_base not in (None, 0, 1):
        raise MedtuneError(f"{path}: cop_base must be 0 (hub, cop 0-3) or 1 (original release, cop 1-4), "
                           f"not {cop_base!r}")
    rows = []
    for where, lineno, obj in _read_jsonl(path):
        question = _question(where, obj)
        options = {}
        for letter, key in zip("ABCD", ("opa", "opb", "opc", "opd")):
            if not isinstance(obj.get(key), str):
                raise MedtuneError(f"{where}: field {key!r} must be the option text (a string)")
            options[letter] = obj[key]
        cop = obj.get("cop")
        if not _is_int(cop) or not 0 <= cop <= 4:
            # the hub's test split stores cop -1: its answers were never released
            raise MedtuneError(f"{where}: field 'cop' {cop!r} is not an option index 0-3 or 1-4 (MedMCQA's test split "
                               "has no answers; evaluate on the validation split)")
        subject = obj.get("subject_name")
        rows.append((where, str(obj.get("id", lineno)), question, options, cop,
                     subject if isinstance(subject, str) else ""))
    if not rows:
        raise MedtuneError(f"{path}: no items")
    if cop_base is None:
        seen = {row[4] for row in rows}
        if 0 in seen and 4 in seen:
            raise MedtuneError(f"{path}: field 'cop' has both 0 and 4, so it is neither 0-3 nor 1-4")
        if 0 not in seen and 4 not in seen:
            raise MedtuneError(f"{path}: field 'cop' only has values 1-3, so its base can't be told from the data; "
                               "pass cop_base=0 (hub export, 0-3) or cop_base=1 (original release, 1-4)")
        cop_base = 0 if 0 in seen else 1
    items = []
    for where, item_id, question, options, cop, subject in rows:
        if not 0 <= cop - cop_base <= 3:
            raise MedtuneError(f"{where}: field 'cop' {cop} is out of range for {cop_base}-based indices")
        items.append(Item(item_id, question, options, "ABCD"[cop - cop_base], subject=subject))
    return items


def load_medmcqa(path: Path, cop_base: int | None = None) -> list[Item]:
    """MedMCQA in either shape, told apart by the first record: MedQA-shaped (`options`) or hub rows (`opa`).

    `cop_base` is passed on to `load_medmcqa_hub`; MedQA-shaped files carry letters and don't use it.
    """
    first = next(_read_jsonl(path), None)
    if first is None:
        raise MedtuneError(f"{path}: no items")
    where, _, obj = first
    if "options" in obj:
        return load_multiple_choice(path)
    if "opa" in obj:
        return load_medmcqa_hub(path, cop_base)
    raise MedtuneError(f"{where}: neither a MedQA-shaped record ('question', 'options', 'answer_idx') nor a MedMCQA "
                       "hub row ('question', 'opa'..'opd', 'cop')")


def load_pubmedqa(ori_pqal_path: Path, test_ids_path: Path | None = None) -> list[Item]:
    """PubMedQA PQA-L test items: `ori_pqal.json` records for the PMIDs of `test_ground_truth.json`, in its order.

    Only the official test set is loaded, because the rest of `ori_pqal.json` is the train/dev pool. Without
    `test_ids_path`, `test_ground_truth.json` beside `ori_pqal.json` is used.
    """
    ori_pqal_path = Path(ori_pqal_path)
    test_ids_path = Path(test_ids_path) if test_ids_path else ori_pqal_path.with_name("test_ground_truth.json")
    if not test_ids_path.is_file():
        raise MedtuneError(f"{test_ids_path}: file not found; pass test_ids_path= the official test_ground_truth.json "
                           "({PMID: label}) so that only the 500 test questions are loaded")
    records, labels = _read_json(ori_pqal_path), _read_json(test_ids_path)
    if not isinstance(records, dict):
        raise MedtuneError(f"{ori_pqal_path}: expected one JSON object keyed by PMID")
    if not isinstance(labels, dict) or not labels:
        raise MedtuneError(f"{test_ids_path}: expected a non-empty JSON object {{PMID: 'yes'|'no'|'maybe'}}")
    letter_of = {label: letter for letter, label in PUBMEDQA_OPTIONS.items()}
    items = []
    for pmid, label in labels.items():
        if not isinstance(label, str) or label not in letter_of:
            raise MedtuneError(f"{test_ids_path}: key {pmid!r}: label {label!r} is not one of yes/no/maybe")
        record = records.get(pmid)
        where = f"{ori_pqal_path}: key {pmid!r}"
        if record is None:
            raise MedtuneError(f"{where}: test PMID from {test_ids_path} is missing")
        if not isinstance(record, dict):
            raise MedtuneError(f"{where}: expected an object with QUESTION, CONTEXTS and final_decision")
        question, contexts = _question(where, record, "QUESTION"), record.get("CONTEXTS")
        if not isinstance(contexts, list) or not contexts or not all(isinstance(c, str) for c in contexts):
            raise MedtuneError(f"{where}: field 'CONTEXTS' must be a non-empty list of abstract sections")
        if record.get("final_decision") != label:
            raise MedtuneError(f"{where}: final_decision {record.get('final_decision')!r} disagrees with the test "
                               f"label {label!r} in {test_ids_path}")
        items.append(Item(pmid, question, dict(PUBMEDQA_OPTIONS), letter_of[label],
                          context="\n\n".join(c.strip() for c in contexts)))
    return items


def _mmlu_jsonl_rows(path: Path) -> Iterator[tuple[str, str, str, list[str], int]]:
    """Yield (where, subject, question, choices, answer index) from cais/mmlu hub rows saved as JSONL."""
    for where, _, obj in _read_jsonl(path):
        question, subject = _question(where, obj), obj.get("subject")
        choices, answer = obj.get("choices"), obj.get("answer")
        if not isinstance(subject, str) or not subject:
            raise MedtuneError(f"{where}: field 'subject' must name the MMLU subject (e.g. 'anatomy')")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise MedtuneError(f"{where}: field 'choices' must be a list of option texts")
        if not _is_int(answer) or not 0 <= answer < len(choices):
            raise MedtuneError(f"{where}: field 'answer' {answer!r} must be a choice index 0-{len(choices) - 1}")
        yield where, subject, question, choices, answer


def _mmlu_csv_rows(path: Path) -> Iterator[tuple[str, str, str, list[str], int]]:
    """Yield the same tuples from an original headerless MMLU CSV; the subject comes from the file name."""
    subject = path.stem.removesuffix("_test").removesuffix("_val").removesuffix("_dev")
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        start = 1
        for row in reader:
            where, start = f"{path}:{start}", reader.line_num + 1  # a quoted row may span lines: report its first
            if not row:
                continue
            if len(row) != 6:
                raise MedtuneError(f"{where}: expected 6 columns (question, A, B, C, D, answer letter), got {len(row)}")
            if not row[0].strip():
                raise MedtuneError(f"{where}: the question (column 1) is empty")
            if row[5].strip() not in ("A", "B", "C", "D"):
                raise MedtuneError(f"{where}: answer (column 6) {row[5]!r} is not one of A, B, C, D")
            yield where, subject, row[0].strip(), row[1:5], "ABCD".index(row[5].strip())


def _mmlu_files(path: Path, subjects: Sequence[str]) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise MedtuneError(f"{path}: no such file or directory")
    if any(path.rglob("*_test.csv")):
        files = []
        for subject in subjects:
            found = sorted(path.rglob(f"{subject}_test.csv"))
            if len(found) != 1:
                raise MedtuneError(f"{path}: expected one {subject}_test.csv below it, found {len(found)}")
            files += found
        return files
    files = sorted(path.glob("*.jsonl"))
    if not files:
        raise MedtuneError(f"{path}: no MMLU files (*_test.csv from the original release, or *.jsonl hub rows)")
    return files


def load_mmlu(path_or_dir: Path, subjects: Sequence[str] = MMLU_MEDICAL) -> list[Item]:
    """MMLU items of the given subjects from cais/mmlu hub rows (JSONL) or the original `<subject>_test.csv` files.

    A directory is read as the original release's CSVs when it holds `*_test.csv` files (found at any depth, so
    `data/` works), else as every `*.jsonl` directly in it, which should then hold one split. Every subject asked
    for must have items, so a score is never silently computed over fewer subjects than named. Ids are
    `<subject>:<n>`, n counting that subject's questions in file order from 0 (the same in both shapes).
    """
    path = Path(path_or_dir)
    wanted = (subjects,) if isinstance(subjects, str) else tuple(subjects)
    items: list[Item] = []
    per_subject: Counter[str] = Counter()
    present: set[str] = set()
    for file in _mmlu_files(path, wanted):
        rows = _mmlu_csv_rows(file) if file.suffix == ".csv" else _mmlu_jsonl_rows(file)
        for _, subject, question, choices, answer in rows:
            present.add(subject)
            if subject not in wanted:
                continue
            options = {LETTERS[i]: choice for i, choice in enumerate(choices)}
            items.append(Item(f"{subject}:{per_subject[subject]}", question, options, LETTERS[answer],
                              subject=subject))
            per_subject[subject] += 1
    missing = [s for s in wanted if not per_subject[s]]
    if missing:
        raise MedtuneError(f"{path}: no MMLU items for subject(s) {missing}; subjects present: {sorted(present)} "
                           "(pass subjects= to choose among them)")
    return items


BENCHMARK_LOADERS: dict[str, Callable[..., list[Item]]] = {
    "medqa": load_multiple_choice,
    "medmcqa": load_medmcqa,
    "pubmedqa": load_pubmedqa,
    "mmlu": load_mmlu,
}


def load_benchmark(kind: str, path: Path, **kw: Any) -> list[Item]:
    """Load a benchmark by kind; `kw` are the loader's own options (e.g. `subjects` for mmlu)."""
    loader = BENCHMARK_LOADERS.get(kind)
    if loader is None:
        raise MedtuneError(f"unknown benchmark kind {kind!r}: choose one of {sorted(BENCHMARK_LOADERS)}")
    try:
        inspect.signature(loader).bind(path, **kw)
    except TypeError:
        options = list(inspect.signature(loader).parameters)[1:]
        raise MedtuneError(f"benchmark kind {kind!r} takes options {options}, not {sorted(kw)}") from None
    if not Path(path).exists():
        raise MedtuneError(f"{path}: file not found (benchmark kind {kind!r})")
    return loader(Path(path), **kw)


def _apportion(sizes: dict[Any, int], limit: int) -> dict[Any, int]:
    """Largest-remainder shares of `limit` in proportion to `sizes` (ties go to the earlier key in sorted order)."""
    total = sum(sizes.values())
    shares = {key: limit * size // total for key, size in sizes.items()}
    by_remainder = sorted(sorted(sizes), key=lambda key: -(limit * sizes[key] % total))
    for key in by_remainder[: limit - sum(shares.values())]:
        shares[key] += 1
    return shares


def stratified_sample(items: Sequence[Item], limit: int, seed: int) -> list[Item]:
    """`limit` items drawn with the same proportions of gold letters, and of subjects where items have them.

    Each letter's count is its proportional share rounded by largest remainder, so it is within 1 of exact.
    Within that, each (letter, subject) cell gets the floor of its share and the leftover units go to the cells
    with the largest remainders whose subject is still below its own rounded share. That rounding is greedy, so a
    subject's count is usually but not always within 1 of exact (in random trials about 1 in 100 was off by 1-2).
    Items within a cell are drawn with `random.Random(seed)`, and the result keeps the original order.
    """
    if limit < 0:
        raise MedtuneError(f"sample limit must be >= 0, not {limit}")
    if limit >= len(items):
        return list(items)
    cells: dict[tuple[str, str], list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        cells[(item.answer, item.subject)].append(index)
    letter_goal = _apportion(Counter(item.answer for item in items), limit)
    subject_goal = _apportion(Counter(item.subject for item in items), limit)
    share = {cell: divmod(limit * len(members), len(items)) for cell, members in cells.items()}  # (floor, remainder)
    take = {cell: floor for cell, (floor, _) in share.items()}
    letter_got, subject_got = Counter(), Counter()
    for (letter, subject), n in take.items():
        letter_got[letter] += n
        subject_got[subject] += n
    # a cell with a non-zero remainder may take one more item; each letter's goal is always reachable this way
    candidates = sorted((cell for cell in sorted(cells) if share[cell][1]), key=lambda cell: -share[cell][1])
    for respect_subject in (True, False):
        for cell in candidates:
            letter, subject = cell
            if take[cell] > share[cell][0] or letter_got[letter] >= letter_goal[letter]:
                continue  # already rounded up, or its letter is full
            if respect_subject and subject_got[subject] >= subject_goal[subject]:
                continue
            take[cell] += 1
            letter_got[letter] += 1
            subject_got[subject] += 1
    rng = random.Random(seed)
    chosen = [index for cell in sorted(cells) for index in rng.sample(cells[cell], take[cell])]
    return [items[index] for index in sorted(chosen)]
