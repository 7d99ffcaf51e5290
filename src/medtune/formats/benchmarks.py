"""Loading medical multiple-choice benchmarks (MedQA, MedMCQA, PubMedQA, MMLU) into one item shape.

A leaf module: evaluation loads its benchmarks here, and the data and pairs stages load the same files here for
their contamination guard, so no stage imports another to read a benchmark.

Records are read by the shared readers of `medtune.formats` (the training data uses the same ones), so every file
may be JSON Lines, a JSON array or Parquet, plain or compressed (gzip, bzip2, xz, zstd). Shapes read:
- MedQA-USMLE (`question`, `options` {letter: text}, `answer_idx`): the MedQA and MedMCQA files of the
  medagents benchmark and the medreason eval sets.
- MedMCQA rows (`id`, `question`, `opa`..`opd`, `cop`), as on the hub or in the original release.
- PubMedQA PQA-L `ori_pqal.json` restricted to the official test PMIDs of `test_ground_truth.json`.
- MMLU as cais/mmlu ships it: hub rows (`question`, `subject`, `choices`, `answer` 0-3), or the original
  headerless CSVs (`anatomy_test.csv`: question, A, B, C, D, answer letter).
"""

from __future__ import annotations

import csv
import inspect
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from medtune.errors import MedtuneError
from medtune.formats.choice import (
    LETTERS,
    PUBMEDQA_OPTIONS,
    BadItem,
    Item,
    cop_base_of,
    detect_format,
    medmcqa_item,
    multiple_choice_item,
    pubmedqa_item,
    with_cop,
)
from medtune.formats.files import COMPRESSED_SUFFIXES, iter_raw_records, open_text, plain_name, read_json_document

MMLU_MEDICAL = ("anatomy", "clinical_knowledge", "college_biology", "college_medicine", "medical_genetics",
                "professional_medicine")


def _records(path: Path) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Yield ("file:line" or "file[index]" with its folder, key, object) for each record; a bad one is an error."""
    for location, obj, error, key in iter_raw_records(path):
        where = str(path.with_name(location))
        if error is not None:
            reason, _, detail = error.partition("|")
            raise MedtuneError(f"{where}: {reason} ({detail.rsplit(' at column', 1)[0]})")
        if not isinstance(obj, dict):
            raise MedtuneError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        yield where, key, obj


def load_multiple_choice(path: Path) -> list[Item]:
    """MedQA-shaped records: `question`, `options` {letter: text}, `answer_idx`; id from `realidx`, `id` or the line."""
    items = []
    for where, key, obj in _records(path):
        try:
            items.append(multiple_choice_item(obj, key))
        except BadItem as bad:
            raise MedtuneError(f"{where}: {bad.message}") from None
    if not items:
        raise MedtuneError(f"{path}: no items")
    return items


def load_medmcqa_hub(path: Path, cop_base: int | None = None) -> list[Item]:
    """MedMCQA rows as on the hub (`id`, `question`, `opa`..`opd`, `cop`, optional `subject_name`).

    `cop` is 0-3 in the hub dataset (openlifescienceai/medmcqa) and 1-4 in the original release's JSON. With
    `cop_base=None` the base is read from the data: a 0 anywhere means 0-based, a 4 anywhere means 1-based; a file
    with both is an error, and one with only 1-3 (possible in a small file) needs `cop_base` given.
    """
    if cop_base not in (None, 0, 1):
        raise MedtuneError(f"{path}: cop_base must be 0 (hub, cop 0-3) or 1 (original release, cop 1-4), "
                           f"not {cop_base!r}")
    rows = []
    for where, key, obj in _records(path):
        try:
            rows.append((where, *medmcqa_item(obj, key)))
        except BadItem as bad:
            raise MedtuneError(f"{where}: {bad.message}") from None
    if not rows:
        raise MedtuneError(f"{path}: no items")
    if cop_base is None:
        try:
            cop_base = cop_base_of(cop for _, _, cop in rows)
        except BadItem as bad:
            raise MedtuneError(f"{path}: {bad.message}") from None
        if cop_base is None:
            raise MedtuneError(f"{path}: field 'cop' only has values 1-3, so its base can't be told from the data; "
                               "pass cop_base=0 (hub export, 0-3) or cop_base=1 (original release, 1-4)")
    items = []
    for where, item, cop in rows:
        try:
            items.append(with_cop(item, cop, cop_base))
        except BadItem as bad:
            raise MedtuneError(f"{where}: {bad.message}") from None
    return items


def load_medmcqa(path: Path, cop_base: int | None = None) -> list[Item]:
    """MedMCQA in either shape, told apart by the first record: MedQA-shaped (`options`) or hub rows (`opa`).

    `cop_base` is passed on to `load_medmcqa_hub`; MedQA-shaped files carry letters and don't use it.
    """
    first = next(_records(path), None)
    if first is None:
        raise MedtuneError(f"{path}: no items")
    where, _, obj = first
    shape = detect_format(obj)
    if shape == "multiple_choice":
        return load_multiple_choice(path)
    if shape == "medmcqa":
        return load_medmcqa_hub(path, cop_base)
    raise MedtuneError(f"{where}: neither a MedQA-shaped record ('question', 'options', 'answer_idx') nor a MedMCQA "
                       "hub row ('question', 'opa'..'opd', 'cop')")


def load_pubmedqa(ori_pqal_path: Path, test_ids_path: Path | None = None) -> list[Item]:
    """PubMedQA PQA-L test items: `ori_pqal.json` records for the PMIDs of `test_ground_truth.json`, in its order.

    Only the official test set is loaded, because the rest of `ori_pqal.json` is the train/dev pool. Without
    `test_ids_path`, `test_ground_truth.json` beside `ori_pqal.json` is used (compressed copies are read too).
    """
    ori_pqal_path = Path(ori_pqal_path)
    if test_ids_path is None:
        beside = [ori_pqal_path.with_name("test_ground_truth.json" + suffix) for suffix in ("", *COMPRESSED_SUFFIXES)]
        test_ids_path = next((p for p in beside if p.is_file()), beside[0])
    test_ids_path = Path(test_ids_path)
    if not test_ids_path.is_file():
        raise MedtuneError(f"{test_ids_path}: file not found; pass test_ids_path= the official test_ground_truth.json "
                           "({PMID: label}) so that only the 500 test questions are loaded")
    labels = read_json_document(test_ids_path)
    if not isinstance(labels, dict) or not labels:
        raise MedtuneError(f"{test_ids_path}: expected a non-empty JSON object {{PMID: 'yes'|'no'|'maybe'}}")
    for pmid, label in labels.items():
        if not isinstance(label, str) or label not in PUBMEDQA_OPTIONS.values():
            raise MedtuneError(f"{test_ids_path}: key {pmid!r}: label {label!r} is not one of yes/no/maybe")
    records = {}
    for _, key, obj in _records(ori_pqal_path):
        if key in labels:
            records[key] = obj
    items = []
    for pmid, label in labels.items():
        where = f"{ori_pqal_path}: key {pmid!r}"
        record = records.get(pmid)
        if record is None:
            raise MedtuneError(f"{where}: test PMID from {test_ids_path} is missing")
        try:
            item = pubmedqa_item(record, pmid)
        except BadItem as bad:
            raise MedtuneError(f"{where}: {bad.message}") from None
        if PUBMEDQA_OPTIONS[item.answer] != label:
            raise MedtuneError(f"{where}: final_decision {record.get('final_decision')!r} disagrees with the test "
                               f"label {label!r} in {test_ids_path}")
        items.append(item)
    return items


def _mmlu_jsonl_rows(path: Path) -> Iterator[tuple[str, str, str, list[str], int]]:
    """Yield (where, subject, question, choices, answer index) from cais/mmlu hub rows saved as JSONL."""
    for where, _, obj in _records(path):
        question, subject = obj.get("question"), obj.get("subject")
        choices, answer = obj.get("choices"), obj.get("answer")
        if not isinstance(question, str) or not question.strip():
            raise MedtuneError(f"{where}: field 'question' must be a non-empty string")
        if not isinstance(subject, str) or not subject:
            raise MedtuneError(f"{where}: field 'subject' must name the MMLU subject (e.g. 'anatomy')")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise MedtuneError(f"{where}: field 'choices' must be a list of option texts")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise MedtuneError(f"{where}: field 'answer' {answer!r} must be a choice index 0-{len(choices) - 1}")
        yield where, subject, question.strip(), choices, answer


def _mmlu_csv_rows(path: Path) -> Iterator[tuple[str, str, str, list[str], int]]:
    """Yield the same tuples from an original headerless MMLU CSV; the subject comes from the file name."""
    subject = Path(plain_name(path)).stem.removesuffix("_test").removesuffix("_val").removesuffix("_dev")
    with open_text(path) as fh:
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
    if any(path.rglob("*_test.csv*")):
        files = []
        for subject in subjects:
            found = sorted(f for f in path.rglob(f"{subject}_test.csv*") if plain_name(f) == f"{subject}_test.csv")
            if len(found) != 1:
                raise MedtuneError(f"{path}: expected one {subject}_test.csv below it, found {len(found)}")
            files += found
        return files
    files = sorted(f for f in path.glob("*.jsonl*") if plain_name(f).endswith(".jsonl"))
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
        rows = _mmlu_csv_rows(file) if plain_name(file).endswith(".csv") else _mmlu_jsonl_rows(file)
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
