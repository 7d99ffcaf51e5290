"""Letter balancing (medtune.formats.relabel): seeded uniform gold letters, options permuted with the gold text at
its new letter, references rewritten through the permutation, unclear records kept and counted, the report."""

from __future__ import annotations

from collections import Counter

import pytest

from medtune.formats import relabel as R

PREAMBLE = "Please answer the following multiple-choice question:\n"
OPTIONS4 = {"A": "Aspirin", "B": "Heparin", "C": "Warfarin", "D": "Insulin"}


def mc(question: str, options: dict[str, str], reply: str) -> tuple[str, str]:
    listed = "\n".join(f"{letter}. {text}" for letter, text in options.items())
    return f"{PREAMBLE}{question}\n{listed}", reply


def option_lines(user: str) -> dict[str, str]:
    return {line[0]: line[3:] for line in user.split("\n") if R.OPTION_LINE.match(line)}


def synthetic(n4: int = 103, n5: int = 17) -> list[tuple[str, str]]:
    """Skewed keys: 4-option records answered A (70%) or B; 5-option records all E."""
    records = []
    for i in range(n4):
        gold = "A" if i % 10 < 7 else "B"
        options = {letter: f"drug {letter.lower()}{i}" for letter in "ABCD"}
        records.append(mc(f"Question {i} about the heart?", options,
                          f"Consider option {gold}: drug {gold.lower()}{i} fits.\nThe answer is {gold}."))
    for i in range(n5):
        options = {letter: f"cause {letter.lower()}{i}" for letter in "ABCDE"}
        records.append(mc(f"Question {i} about the kidney?", options, "Only option E fits.\nThe answer is E."))
    return records


def balance(records: list[tuple[str, str]], seed: int) -> tuple[list[tuple[str, str]], R.LetterStats]:
    stats = R.LetterStats()
    balancer = R.Balancer(seed)
    return [R.balance_one(user, reply, balancer, stats, f"r{i}") for i, (user, reply) in enumerate(records)], stats


def test_balance_is_uniform_within_one_per_option_count_and_seeded():
    records = synthetic()
    out, stats = balance(records, seed=7)
    golds = Counter((len(option_lines(user)), R.read(user, reply).gold) for user, reply in out)
    four = [golds[(4, letter)] for letter in "ABCD"]
    five = [golds[(5, letter)] for letter in "ABCDE"]
    assert sum(four) == 103 and max(four) - min(four) <= 1
    assert sum(five) == 17 and max(five) - min(five) <= 1
    assert stats.relettered + stats.in_place == 120 and stats.multiple_choice == 120 and not stats.kept
    assert balance(records, seed=7)[0] == out  # deterministic
    other = balance(records, seed=8)[0]
    assert other != out
    golds8 = Counter(R.read(user, reply).gold for user, reply in other[:103])
    assert max(golds8.values()) - min(golds8.values()) <= 1


def test_the_gold_text_moves_to_its_new_letter_and_nothing_else_changes():
    out, _ = balance(synthetic(), seed=3)
    for (user, reply), (new_user, new_reply) in zip(synthetic(), out):
        old, new = option_lines(user), option_lines(new_user)
        gold, new_gold = R.read(user, reply).gold, R.read(new_user, new_reply).gold
        assert new[new_gold] == old[gold]
        assert sorted(new.values()) == sorted(old.values())
        moved = {letter for letter in old if old[letter] != new[letter]}
        assert moved == ({gold, new_gold} if gold != new_gold else set())  # a swap: two options at most
        assert new_user.split("\n")[:2] == user.split("\n")[:2]  # the preamble and the question stay


def test_references_to_any_swapped_letter_are_rewritten_and_words_are_not():
    user, reply = mc("A 45-year-old man has chest pain. Which drug is given first?", OPTIONS4, (
        "A patient with hepatitis B and low vitamin D may still get option B. Option D (Insulin) is wrong, and "
        "Heparin (B) acts at once; options B and D differ in speed.\n"
        "B. Heparin: fast.\nD. Insulin: no.\n**B** it is; \\boxed{B}\nAns. b. Heparin\nAnswer: B\n"
        "The answer is B."))
    question = R.read(user, reply)
    assert question.gold == "B" and question.movable == frozenset("ABCD")
    new_user, new_reply = R.relabel(question, "D")
    assert option_lines(new_user) == {"A": "Aspirin", "B": "Insulin", "C": "Warfarin", "D": "Heparin"}
    assert new_reply == (
        "A patient with hepatitis B and low vitamin D may still get option D. Option B (Insulin) is wrong, and "
        "Heparin (D) acts at once; options D and B differ in speed.\n"
        "D. Heparin: fast.\nB. Insulin: no.\n**D** it is; \\boxed{D}\nAns. d. Heparin\nAnswer: D\n"
        "The answer is D.")
    assert R.read(new_user, new_reply).gold == "D"


def test_a_genus_is_not_an_option_but_a_letter_before_its_own_text_is():
    options = {"A": "salmonella typhi", "B": "shigella", "C": "vibrio cholerae", "D": "campylobacter", "E": "rotavirus"}
    user, reply = mc("Which organism?", options,
                     "E. coli is common. C. vibrio cholerae fits the rice-water stool.\nThe answer is C.")
    question = R.read(user, reply)
    assert question.movable == frozenset("ABCDE")
    _, new_reply = R.relabel(question, "E")
    assert new_reply == "E. coli is common. E. vibrio cholerae fits the rice-water stool.\nThe answer is E."


@pytest.mark.parametrize("reply, options, reason", [
    ("Adenine (A) pairs with thymine.\nThe answer is A.", OPTIONS4, R.BARE_LETTER),  # a word or option A?
    ("Blood types A, B, AB or O.\nThe answer is B.", OPTIONS4, R.BARE_LETTER),
    ("Sub-points: (a) dose, (b) timing.\nThe answer is B.", OPTIONS4, R.BARE_LETTER),
    ("Option E is best.\nThe answer is A.", OPTIONS4, R.FOREIGN_LETTER),  # written for another option set
    ("The answer is D.", {**OPTIONS4, "D": "All of the above"}, R.OPTIONS_REFER),
    ("The answer is C.", {**OPTIONS4, "C": "Both A and B"}, R.OPTIONS_REFER),
])
def test_unclear_records_are_kept_as_they_are_and_counted(reply, options, reason):
    user, reply = mc("Which drug?", options, reply)
    stats, balancer = R.LetterStats(), R.Balancer(0)
    gold = R.read(user, reply).gold if reason == R.BARE_LETTER else None
    outs = [R.balance_one(user, reply, balancer, stats, f"r{i}") for i in range(8)]
    if gold is not None:  # only the gold letter's unclear use keeps the record
        assert gold not in R.read(user, reply).movable
    assert all(out == (user, reply) for out in outs)
    assert stats.kept == Counter({reason: 8}) and stats.relettered == stats.in_place == 0
    assert stats.multiple_choice == 8 and sum(stats.before.values()) == 8 == sum(stats.after.values())
    assert stats.report(True)["examples"][reason][0].startswith("r0")


def test_an_unclear_other_letter_only_narrows_the_choice():
    """'type D' is a word, but 'Drug C' is unclear: C can't move, the record still can (among A, B, D)."""
    user, reply = mc("Which drug?", OPTIONS4, "Drug C is slow; type D is rare.\nThe answer is A.")
    assert R.read(user, reply).movable == frozenset("ABD")
    golds = set()
    for seed in range(20):
        new_user, new_reply = R.balance_one(user, reply, R.Balancer(seed), R.LetterStats(), "r")
        golds.add(R.read(new_user, new_reply).gold)
        assert "Drug C is slow; type D is rare." in new_reply
    assert golds == {"A", "B", "D"}


def test_all_of_the_above_stays_last_and_the_options_above_it_may_swap():
    options = {**OPTIONS4, "D": "All of the above"}
    user, reply = mc("Which drug?", options, "Option B works.\nThe answer is B.")
    assert R.read(user, reply).movable == frozenset("ABC")
    golds = set()
    for seed in range(20):
        new_user, new_reply = R.balance_one(user, reply, R.Balancer(seed), R.LetterStats(), "r")
        assert option_lines(new_user)["D"] == "All of the above"
        golds.add(R.read(new_user, new_reply).gold)
    assert golds == {"A", "B", "C"}


@pytest.mark.parametrize("user, reply, reason", [
    (mc("Is it?", {"A": "yes", "B": "no", "C": "maybe"}, "The answer is A.")[0], "The answer is A.", R.LABELS),
    ("What causes scurvy?", "Vitamin C deficiency.", R.NO_OPTIONS),
    (mc("Which drug?", OPTIONS4, "")[0], "It depends on the patient.", R.NO_ANSWER),
    (f"{PREAMBLE}Which?\nA. one\nC. three\nB. two", "The answer is A.", R.OPTIONS_BLOCK),
])
def test_labels_and_records_without_options_or_answer_are_not_multiple_choice(user, reply, reason):
    stats = R.LetterStats()
    assert R.balance_one(user, reply, R.Balancer(0), stats, "r") == (user, reply)
    bucket = stats.kept if reason == R.OPTIONS_BLOCK else stats.not_multiple_choice
    assert bucket == Counter({reason: 1})


def test_messages_of_more_than_one_exchange_are_left_alone():
    user, reply = mc("Which drug?", OPTIONS4, "The answer is B.")
    messages = ({"role": "user", "content": user}, {"role": "assistant", "content": reply},
                {"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."})
    stats = R.LetterStats()
    assert R.balance_messages(messages, R.Balancer(0), stats, "r") is messages
    assert stats.not_multiple_choice == Counter({R.NOT_ONE_TURN: 1})
    system = ({"role": "system", "content": "Be brief."}, *messages[:2])
    out = [R.balance_messages(system, R.Balancer(s), R.LetterStats(), "r") for s in range(12)]
    assert {m[0]["content"] for m in out} == {"Be brief."}
    assert {R.read(m[1]["content"], m[2]["content"]).gold for m in out} == set("ABCD")


def test_report_shares_before_and_after():
    records = synthetic(n4=40, n5=0) + [mc("Which?", {**OPTIONS4, "D": "None of the above"}, "The answer is D.")]
    _, stats = balance(records, seed=1)
    report = stats.report(True)
    assert report["gold_counts_before"] == {"A": 28, "B": 12, "D": 1}
    assert report["gold_shares_before"] == {"A": round(28 / 41, 4), "B": round(12 / 41, 4), "D": round(1 / 41, 4)}
    # the kept record counts at its own D: A 10, B 10, C 10, D 11
    assert sorted(report["gold_counts_after"].values()) == [10, 10, 10, 11]
    assert report["gold_shares_after"]["A"] == round(report["gold_counts_after"]["A"] / 41, 4)
    assert (report["multiple_choice"], report["kept_as_is"], report["kept_by_reason"]) == \
        (41, 1, {R.OPTIONS_REFER: 1})
    assert report["relettered"] + report["in_place"] == 40
    assert report["by_option_count"]["4"]["records"] == 41
    off = R.LetterStats()
    for i, (user, reply) in enumerate(records):
        assert R.balance_one(user, reply, None, off, f"r{i}") == (user, reply)
    assert off.report(False)["gold_counts_after"] == off.report(False)["gold_counts_before"] == \
        {"A": 28, "B": 12, "D": 1}
    assert off.report(False)["relettered"] == 0 and off.report(False)["kept_as_is"] == 0
