"""Re-lettering multiple-choice records so that gold letters are uniform, with every letter reference rewritten.

Small models tuned on answer keys learn the keys' letter prior (the quality study's training answers were 34% "A";
tuned models then answered "A" 62-75% of the time). `Balancer` gives each multiple-choice record a target letter,
seeded, so that within each option count the gold letters come out as equal as possible; `read` parses a question
and its reply, and `relabel` moves the gold option to its target by swapping it with the option at the target letter
(the permutation that moves the fewest options, so the fewest references need rewriting).

A record is read as: one user turn whose text lists its options as one block of lines "A. text" (also "A) text",
"(A) text", "A: text"), lettered A, B, C... in order, and a reply whose final answer names one of them
(`medtune.answers.extract_letter`). Options that are yes/no/maybe are labels (PubMedQA), never re-lettered.

Every standalone occurrence of a letter the swap moves, in the question text around the options and in the reply,
must be one of:
- a reference, rewritten through the permutation: "option B", "options B and C", "Ans: b", "answer is (C)",
  "The answer is C.", "Answer: B", "**B**", "\\boxed{B}", a line starting "B." / "B)" / "(B)" / "B:", "(B)" next to
  option B's own text, "B is correct", a final line that is only the letter;
- a word: the article "A" ("A 45-year-old ..."), or a letter named by its neighbour ("vitamin C", "hepatitis B",
  "B cells", "type A", "anti-B", "Rho(D)"), left as it is.
Anything else ("A, B, AB, or O", "adenine (A)") could be either, so that letter cannot move: a record whose gold
letter cannot move is kept as it is and counted with the reason. "All of the above" (or "None of these") pins itself
and the options after it; the options above it may still swap. A record whose options name each other by letter
("Both A and B"), or whose reply refers to a letter that is not one of its options, is kept as it is.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from medtune.answers import extract_letter

# ---- reasons (short categories, counted in the data and pairs reports) ----
NO_OPTIONS = "no lettered options"
NO_ANSWER = "reply names no option as its answer"
LABELS = "yes/no/maybe labels"
NOT_ONE_TURN = "not one question and one reply"
OPTIONS_BLOCK = "options are not one block lettered A, B, C..."
OPTIONS_REFER = "an option refers to other options"
FOREIGN_LETTER = "reply refers to a letter that is not an option"
BARE_LETTER = "a letter that may be a word or a reference"

OPTION_LINE = re.compile(r"^(\s*\(?)([A-J])([.):]\s+)(\S.*)$")
LABEL_TEXTS = {"yes", "no", "maybe"}
# "All of the above", "None of these": refers to the options listed before it, so it and those after it stay put
ABOVE = re.compile(r"(?i)\b(?:(?:all|none|both|neither|either|any)\s+of\s+the(?:se|m|\s+above|\s+following)|the\s+above"
                   r"|of\s+these)\b")
# "Both A and B", "A and C", "(a) & (c)", "B, C": names other options by letter, so no option may move
BY_LETTER = re.compile(r"(?i)\bboth\s+\(?[a-j]\)?\s+(?:and|&)\s+\(?[a-j]\)?\b"
                       r"|^\W*\(?[a-j]\)?\s*(?:,|&|/|\s(?:and|or)\s)\s*\(?[a-j]\)?(?:\W|$)")

# A standalone letter: no letter, digit or joining mark touches it ("B12", "C3", "°C", "A.D." and "e.g." are not).
# Only such letters are looked at, each in its own neighbourhood (a few regex matches anchored at it), so a long
# reasoning costs one scan for its capitals A-J and its rare lowercase b-j.
_ALONE_AFTER = r"(?![A-Za-z0-9_]|[.\-/][A-Za-z0-9])"


def _alone(letters: str) -> re.Pattern:
    # the letter first and the look-behinds after it, so that the engine scans for the letter class alone
    return re.compile(rf"([{letters}])(?<![A-Za-z0-9_°\-/][{letters}])(?<![A-Za-z]['’][{letters}]){_ALONE_AFTER}")


LETTER = _alone("A-Ja-j")
CAPITAL = _alone("A-J")
SMALL = _alone("a-j")  # "a" counts only where it can't be the article: "(a)", "'a'", "a)", "Ans: a."
SMALL_A = re.compile(r"[.:,;)\]\"'‘’“”`]|\s*$|\s*\n")
OPENERS, CLOSERS = "([\"'‘’“”`", ")]\"'‘’“”`"
WINDOW = 80  # characters looked at before a letter for the pattern that ends at it
_Q = "[\"'‘’“”`]"
_ITEM = rf"(?:\*\*)?(?:\(|\[|{_Q})?[A-Ja-j](?![A-Za-z0-9])(?:\)|\]|{_Q})?(?:\*\*)?"
# Strong references, as (pattern ending just before the letter, pattern starting just after it):
# "option B", "options B and C", "Ans: b", "answer is (C)", "correct answer would be D", "Final answer: **B**"
KEYWORD = re.compile(
    r"(?i)\b(?:options?|choices?|answers?|ans|alternatives?)\b\W{0,4}?"
    r"(?:(?:is|are|was|were|would\s+be|will\s+be|should\s+be|must\s+be|seems\s+to\s+be|here\s+is|then\s+is|=)\s*)?"
    rf"[\s.:\-–—=]*(?:{_ITEM}\s*(?:,\s*(?:and|or)?|and|or|/|&)\s*)*(?:\*\*)?[(\[\"'‘’“”`]?$")
KEYWORDS = ("option", "choice", "ans", "alternative")  # a cheap test before KEYWORD
STRONG = (
    (re.compile(r"\\boxed\{\s*\(?$"), re.compile(r"\)?\s*\}")),  # \boxed{B}
    (re.compile(r"\*\*\s*\(?$"), re.compile(r"\)?(?:[.):]|\s*\*\*)")),  # **B**, **B.** ..., **(B) ...**
    (re.compile(r"(?:^|\n)[ \t>#*\-•]*\(?$"), re.compile(r"(?!\.\s+[a-z])(?:\)|\.|:)(?=[\s*]|$)")),  # a line "B. ..."
    (re.compile(r"(?:^|\n)[^\w\n]*\(?$"), re.compile(r"\)?[^\w\n]*(?:\n|$)")),  # a line that is only the letter
)
OWN_TEXT = re.compile(r"[.):]\s*(?:\*\*)?\s*")  # between a letter and its option's text
# Weak references, which give way to a reading as a word ("hepatitis B is the most common"):
WEAK = (
    (None, re.compile(r"\)?\s+(?:is|was|seems|would\s+be|could\s+be|remains)\s+(?:not\s+|also\s+|therefore\s+)?"
                      r"(?:the\s+)?(?:correct|incorrect|right|wrong|best|answer|true|false|unlikely|likely|less|"
                      r"more)\b")),
    # "it is B.", "I would choose C,": a letter closing a clause after a verb
    (re.compile(r"\b(?:is|be|was|choose|chose|select|selected|pick|picked|with)\s+\(?$"),
     re.compile(r"\)?[.,;:!?)]*(?:\s|$)")),
)

# Words that name a letter as a thing, not an option: "vitamin C", "type A", "B cells", "anti-B".
BEFORE = frozenset("""vitamin vitamins vit hepatitis hep type types group groups class classes grade stage factor
    factors protein proteins inhibin plan cluster zone zones phase schedule category level serotype subtype toxin
    influenza streptococcus streptococci strep apolipoprotein apo lipoprotein hemoglobin haemoglobin hb immunoglobulin
    ig blood box boxes list column part statement statements point site line wave area region lead fiber fibers fibre
    fibres band chain complex""".split())
AFTER = re.compile(r"\s*(?:cells?|lymphocytes?|fib(?:er|re)s?|vitamins?|waves?|antigens?|antibod(?:y|ies)|receptors?|"
                   r"strep\w*|toxins?|virus(?:es)?|bands?|chains?|blood|type|negative|positive)\b", re.I)
# After "A", words that make it a letter ("A is", "A and B"), not the article ("A patient", "A 45-year-old").
NOT_ARTICLE = frozenset("is was are were and or nor but would could should might may can cannot does doesn't isn't "
                        "wasn't also vs versus as seems remains".split())


class Unbalanceable(Exception):
    """A record that can't be re-lettered: `reason` is counted, `detail` shows where."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Question:
    """A multiple-choice question as listed in a user turn, with the gold letter its reply names."""

    lines: tuple[str, ...]  # the user text's lines
    block: range  # which of them are the option lines
    options: dict[str, str]
    gold: str
    movable: frozenset[str]  # letters whose every standalone occurrence is a reference or a word
    why_not: dict[str, tuple[str, str]]  # letter -> (reason, detail) for the others
    texts: tuple[str, str, str]  # the user text before the options, after them, and the reply
    refs: tuple[dict[int, str], ...]  # the references found in each of `texts` (position -> letter)

    @property
    def letters(self) -> str:
        return "".join(self.options)


def _options(lines: list[str]) -> tuple[range, dict[str, str]]:
    hits = [i for i, line in enumerate(lines) if OPTION_LINE.match(line)]
    if not hits:
        raise Unbalanceable(NO_OPTIONS)
    block = range(hits[0], hits[-1] + 1)
    letters = [OPTION_LINE.match(lines[i]).group(2) for i in block if OPTION_LINE.match(lines[i])]
    if len(letters) != len(block) or letters != list("ABCDEFGHIJ"[: len(letters)]) or len(letters) < 2:
        raise Unbalanceable(OPTIONS_BLOCK, " ".join(letters))
    return block, {OPTION_LINE.match(lines[i]).group(2): OPTION_LINE.match(lines[i]).group(4).strip() for i in block}


def _segments(question_lines: list[str], block: range) -> list[str]:
    """The user text around the options: the lines before the block and the lines after it (either may be empty)."""
    return ["\n".join(question_lines[: block.start]), "\n".join(question_lines[block.stop:])]


def read(user: str, reply: str) -> Question:
    """The question a user turn lists and the gold letter its reply names; raises Unbalanceable when the record
    is not one (`NO_OPTIONS`, `NO_ANSWER`, `LABELS`) or can't be re-lettered at all."""
    lines = user.split("\n")
    block, options = _options(lines)
    if {text.lower().rstrip(".") for text in options.values()} <= LABEL_TEXTS:
        raise Unbalanceable(LABELS)
    gold = extract_letter(reply, options)
    if gold is None:
        raise Unbalanceable(NO_ANSWER)
    refer = next((text for text in options.values() if BY_LETTER.search(text)), None)
    if refer is not None:
        raise Unbalanceable(OPTIONS_REFER, refer[:60])
    why_not: dict[str, tuple[str, str]] = {}
    above = next((i for i, text in enumerate(options.values()) if ABOVE.search(text)), None)
    if above is not None:  # the options above it may still swap among themselves
        for letter in list(options)[above:]:
            why_not[letter] = (OPTIONS_REFER, list(options.values())[above][:60])
    texts = (*_segments(lines, block), reply)
    found = []
    for text in texts:
        refs, problems = _classify(text, options)
        found.append(refs)
        for letter, detail in problems.items():
            why_not.setdefault(letter, (BARE_LETTER, f"{letter}: {detail}"))
    # "I" past the options is the pronoun or a roman numeral ("I. Background") far more often than an option
    foreign = sorted({letter.upper() for letter in found[-1].values()} - set(options) - {"I"})
    if foreign:
        raise Unbalanceable(FOREIGN_LETTER, ", ".join(foreign))
    movable = frozenset(letter for letter in options if letter not in why_not)
    return Question(tuple(lines), block, options, gold, movable, why_not, texts, tuple(found))


def _matches(before: re.Pattern | None, after: re.Pattern, text: str, at: int) -> bool:
    return (before is None or before.search(text, max(0, at - WINDOW), at) is not None) and \
        after.match(text, at + 1) is not None


def _keyword_before(text: str, at: int) -> bool:
    window = text[max(0, at - WINDOW): at].lower()
    return any(word in window for word in KEYWORDS) and KEYWORD.search(text, max(0, at - WINDOW), at) is not None


def _is_strong(text: str, at: int) -> bool:
    """Whether the letter at `at` is named as an option whatever its neighbours."""
    if _keyword_before(text, at):
        return not (text[at] == "I" and re.match(r"['’]| +[a-z]", text[at + 1: at + 3]))  # "Answer: I think"
    return text[at].isupper() and any(_matches(before, after, text, at) for before, after in STRONG)


def _names_own_option(text: str, at: int, options: dict[str, str]) -> bool:
    """Whether the letter is followed by its own option's text: "B. heparin", "(B) heparin", "B: heparin" (a
    lowercase word after "B." is otherwise a genus, as in "E. coli")."""
    own = options.get(text[at], "").strip().lower()
    sep = OWN_TEXT.match(text, at + 1)
    return len(own) >= 3 and sep is not None and text[sep.end(): sep.end() + 30].lower().startswith(own[:30])


def _is_weak(text: str, at: int, options: dict[str, str]) -> bool:
    """Whether the capital at `at` reads as an option where it does not read as a word: "B is correct", "it is B.",
    "(B)" beside option B's own text ("Basophilia (B)")."""
    if any(_matches(before, after, text, at) for before, after in WEAK):
        return True
    option = options.get(text[at], "").lower()
    if not option or text[at - 1: at] != "(" or text[at + 1: at + 2] != ")":
        return False
    before = text[max(0, at - len(option) - 4): at - 1].lower().rstrip(" *:")
    after = text[at + 2: at + len(option) + 4].lower().lstrip(" *:")
    return before.endswith(option) or after.startswith(option) or after.startswith(option.split()[0] + " ")


def _is_word(text: str, at: int) -> bool:
    """Whether the capital letter at `at` reads as a word or a named thing, not as an option."""
    before, after = text[:at], text[at + 1:]
    if before.endswith("(") and len(before) > 1 and before[-2].isalnum():
        return True  # Rho(D), IgA(...)
    if re.match(r"\. [a-z]", after):
        return True  # a genus: "C. difficile", "E. coli"
    word = re.search(r"([A-Za-z]+)\s+$", before)
    if (word and word.group(1).lower() in BEFORE) or AFTER.match(after):
        return True
    if text[at] == "A":  # the article: "A 45-year-old", "A patient", "A CT scan"; not "A is", "A and B"
        nxt = re.match(r" +(\S+)", after)
        following = nxt.group(1) if nxt else ""
        return bool(following) and (following[0].isdigit() or (following[0].islower() and following.lower().strip(
            ".,;:") not in NOT_ARTICLE) or (following[0].isupper() and len(following) > 1 and following[1].isalpha()))
    return False


def _classify(text: str, options: dict[str, str]) -> tuple[dict[int, str], dict[str, str]]:
    """(position -> letter of each reference, letter -> context of an occurrence that is neither reference nor word).

    References to letters that are not options are kept (the reply's are a reason to keep a record). Lowercase
    letters count only inside a keyword reference ("Ans: b"), or enclosed ("(b)", "b)", "'c'"), which could be a
    sub-list or an option and so counts as neither; other lowercase letters are words."""
    refs: dict[int, str] = {}
    problems: dict[str, str] = {}
    for match in CAPITAL.finditer(text):
        at, letter = match.start(1), match.group(1)
        if _is_strong(text, at) or _names_own_option(text, at, options):
            refs[at] = letter
        elif letter not in options or _is_word(text, at):
            continue
        elif _is_weak(text, at, options):
            refs[at] = letter
        else:
            problems.setdefault(letter, text[max(0, at - 25): at + 25].replace("\n", " "))
    for match in SMALL.finditer(text):
        at = match.start(1)
        if text[at] == "a" and text[at - 1: at] not in OPENERS and not SMALL_A.match(text, at + 1):
            continue
        if _keyword_before(text, at):
            refs[at] = text[at]
        elif text[at - 1: at] in OPENERS and at or text[at + 1: at + 2] in CLOSERS and text[at + 1: at + 2]:
            if text[at].upper() in options:
                problems.setdefault(text[at].upper(), text[max(0, at - 25): at + 25].replace("\n", " "))
    return refs, problems


def _rewrite(text: str, refs: dict[int, str], mapping: dict[str, str]) -> str:
    pieces, last = [], 0
    for at in sorted(refs):
        letter = text[at]
        new = mapping.get(letter.upper(), letter.upper())
        pieces += [text[last:at], new if letter.isupper() else new.lower()]
        last = at + 1
    return "".join(pieces) + text[last:]


def swap(question: Question, target: str) -> dict[str, str]:
    """The permutation (old letter -> new letter) that moves the gold option to `target`."""
    mapping = {letter: letter for letter in question.options}
    mapping[question.gold], mapping[target] = target, question.gold
    return mapping


def relabel(question: Question, target: str) -> tuple[str, str]:
    """The user turn and reply with the gold option at `target`: option lines permuted, references rewritten."""
    for letter in (question.gold, target):
        if letter not in question.movable:
            raise ValueError(f"letter {letter} can't move: {question.why_not[letter]}")
    mapping = swap(question, target)
    lines = list(question.lines)
    texts = {mapping[letter]: text for letter, text in question.options.items()}
    for i in question.block:
        head = OPTION_LINE.match(lines[i])
        lines[i] = f"{head.group(1)}{head.group(2)}{head.group(3)}{texts[head.group(2)]}"
    before, after, reply = (_rewrite(text, refs, mapping) for text, refs in zip(question.texts, question.refs))
    block = question.block
    new = [*([before] if block.start else []), *lines[block.start: block.stop], *([after] if block.stop < len(lines)
                                                                                  else [])]
    return "\n".join(new), reply


def shares(counts: Counter) -> dict[str, float]:
    total = sum(counts.values())
    return {letter: round(counts[letter] / total, 4) for letter in sorted(counts)} if total else {}


@dataclass
class Balancer:
    """Target letters that keep the gold letters of each option count as equal as possible (seeded tie-breaks).

    `assign` picks, among the letters the record can take, one with the fewest golds so far among records with as
    many options; records kept as they are count at their own letter, so later ones make up for them."""

    seed: int
    counts: dict[int, Counter] = field(default_factory=dict)
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(f"balance-letters:{self.seed}")

    def assign(self, letters: str, allowed: set[str] | frozenset[str]) -> str:
        counts = self.counts.setdefault(len(letters), Counter())
        fewest = min(counts[letter] for letter in allowed)
        target = self.rng.choice(sorted(letter for letter in allowed if counts[letter] == fewest))
        counts[target] += 1
        return target


@dataclass
class LetterStats:
    """What re-lettering did to a data set: gold letters before and after, and why records were left alone."""

    before: Counter = field(default_factory=Counter)
    after: Counter = field(default_factory=Counter)
    by_options: dict[int, dict[str, Counter]] = field(default_factory=dict)
    multiple_choice: int = 0
    relettered: int = 0
    in_place: int = 0
    kept: Counter = field(default_factory=Counter)
    not_multiple_choice: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    @staticmethod
    def multiple_choice_reason(reason: str) -> bool:
        """Whether a record refused for `reason` is multiple choice all the same (kept as it is, not skipped)."""
        return reason not in (NO_OPTIONS, NO_ANSWER, LABELS, NOT_ONE_TURN)

    def add(self, letters: str, gold: str, target: str) -> None:
        self.before[gold] += 1
        self.after[target] += 1
        per = self.by_options.setdefault(len(letters), {"before": Counter(), "after": Counter()})
        per["before"][gold] += 1
        per["after"][target] += 1

    def note(self, bucket: Counter, reason: str, where: str, detail: str = "") -> None:
        bucket[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < 3:
            shown.append(f"{where} ({detail})" if detail else where)

    def report(self, enabled: bool) -> dict[str, Any]:
        kept = sum(self.kept.values())
        return {
            "balance_letters": enabled,
            "multiple_choice": self.multiple_choice,
            "relettered": self.relettered,
            "in_place": self.in_place,
            "kept_as_is": kept,
            "kept_by_reason": dict(self.kept.most_common()),
            "not_multiple_choice": sum(self.not_multiple_choice.values()),
            "not_multiple_choice_by_reason": dict(self.not_multiple_choice.most_common()),
            "gold_shares_before": shares(self.before),
            "gold_shares_after": shares(self.after),
            "gold_counts_before": dict(sorted(self.before.items())),
            "gold_counts_after": dict(sorted(self.after.items())),
            "by_option_count": {str(n): {"records": sum(c["before"].values()),
                                         "gold_counts_before": dict(sorted(c["before"].items())),
                                         "gold_counts_after": dict(sorted(c["after"].items()))}
                                for n, c in sorted(self.by_options.items())},
            "examples": self.examples,
        }

    def summary(self) -> str:
        """One line: the gold letters' largest share before and after, and the counts."""
        def top(counts: Counter) -> str:
            share = shares(counts)
            letter = max(share, key=share.get) if share else "-"
            return f"{letter} {share.get(letter, 0):.0%}"
        kept = sum(self.kept.values())
        return (f"largest gold-letter share {top(self.before)} before, {top(self.after)} after; "
                f"{self.relettered} re-lettered, {self.in_place} in place, {kept} kept as they are, "
                f"{sum(self.not_multiple_choice.values())} not multiple choice")


def balance_one(user: str, reply: str, balancer: Balancer | None, stats: LetterStats,
                where: str) -> tuple[str, str]:
    """One question and its reply, re-lettered to the balancer's target; `balancer` None (balancing off): only
    counted. Returns the (possibly unchanged) user text and reply."""
    try:
        question = read(user, reply)
    except Unbalanceable as no:
        if not stats.multiple_choice_reason(no.reason):
            stats.note(stats.not_multiple_choice, no.reason, where, no.detail)
        else:  # multiple choice, but not re-letterable: counted at its own gold letter
            stats.multiple_choice += 1
            gold = _gold(user, reply)
            if gold is not None:
                stats.add(*gold, gold[1])
                if balancer is not None:
                    balancer.counts.setdefault(len(gold[0]), Counter())[gold[1]] += 1
            if balancer is not None:
                stats.note(stats.kept, no.reason, where, no.detail)
        return user, reply
    stats.multiple_choice += 1
    if balancer is None:
        stats.add(question.letters, question.gold, question.gold)
        return user, reply
    if question.gold not in question.movable:
        reason, detail = question.why_not[question.gold]
        stats.note(stats.kept, reason, where, detail)
        balancer.counts.setdefault(len(question.options), Counter())[question.gold] += 1
        stats.add(question.letters, question.gold, question.gold)
        return user, reply
    target = balancer.assign(question.letters, question.movable)
    stats.add(question.letters, question.gold, target)
    if target == question.gold:
        stats.in_place += 1
        return user, reply
    stats.relettered += 1
    return relabel(question, target)


def _gold(user: str, reply: str) -> tuple[str, str] | None:
    """(option letters, gold letter) of a record whose options and answer can be read, else None."""
    try:
        _, options = _options(user.split("\n"))
    except Unbalanceable:
        return None
    gold = extract_letter(reply, options)
    return None if gold is None else ("".join(options), gold)


def balance_messages(messages: tuple[dict[str, str], ...], balancer: Balancer | None, stats: LetterStats,
                     where: str) -> tuple[dict[str, str], ...]:
    """A conversation re-lettered by `balance_one` when it is one question and one reply (after an optional system
    turn); other conversations are counted as not multiple choice and returned as they are."""
    roles = [m["role"] for m in messages]
    if roles not in (["user", "assistant"], ["system", "user", "assistant"]):
        stats.note(stats.not_multiple_choice, NOT_ONE_TURN, where)
        return messages
    user, reply = balance_one(messages[-2]["content"], messages[-1]["content"], balancer, stats, where)
    if (user, reply) == (messages[-2]["content"], messages[-1]["content"]):
        return messages
    return (*messages[:-2], {"role": "user", "content": user}, {"role": "assistant", "content": reply})
