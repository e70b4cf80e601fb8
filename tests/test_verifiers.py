"""Verifiers and bundled datasets, on real math-verify worker processes and the real data files.

The time-bound tests use a 2 s bound: a verdict on a hanging answer must come back wrong, with an error, in
under bound + 1.5 s of its own clock, whichever thread or process asks.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from roll.data import DATA_DIR
from roll.datasets import DATASETS, dataset_records, dataset_rows
from roll.errors import RollError
from roll.tasks import build_prompts
from roll.verifiers import (
    MathVerifier,
    extract_boxed,
    extract_math_answer,
    make_verifier,
    verifier_for_task,
    verify_arith,
)
from roll.workers import CPU_SLACK_S

BOUND_S = 2.0
SLACK_S = 1.5
HANG = r"So the answer is \boxed{9^{9^{9^{9}}}}."  # SymPy tries to evaluate a power tower: hours
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def math_verifier():
    with make_verifier("math", timeout_s=5.0, workers=2) as verifier:
        yield verifier


def _bench():
    """bench/verifier_accuracy.py as a module (bench/ is not a package), for its perturb()."""
    spec = importlib.util.spec_from_file_location("verifier_accuracy", REPO / "bench" / "verifier_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------ arith


@pytest.mark.parametrize("completion, answer, correct, extracted, format_ok", [
    ("12+7=19\n19-5=14\nanswer: 14", "14", True, "14", True),
    ("answer: 15", "14", False, "15", True),
    ("answer: -007", "-7", True, "-7", True),  # leading zeros and sign: integer compare
    ("answer: 14\nand more text", "14", False, "", False),  # the answer line must be the last line
    ("the total is 14", "14", False, "", False),
    ("answer: 14.0", "14", False, "", False),  # integers only
])
def test_arith_cases(completion, answer, correct, extracted, format_ok):
    verdict = verify_arith(completion, answer)
    assert (verdict.correct, verdict.extracted_answer, verdict.format_ok, verdict.error) == \
        (correct, extracted, format_ok, "")
    assert verdict.reward == float(correct) and verdict.milliseconds >= 0


def test_arith_bad_input_is_an_error_not_a_crash():
    assert verify_arith("answer: 3", "three").error == "ground truth 'three' is not an integer"
    huge = verify_arith("answer: " + "9" * 50_000, "9")  # past Python's int-from-str digit limit
    assert (huge.correct, huge.error) == (False, "answer has too many digits")


def test_arith_verifier_batch():
    with make_verifier("arith") as verifier:
        assert (verifier.name, verifier.version) == ("arith", "arith 1")
        verdicts = verifier.verify_many(["answer: 3", "answer: 4", "no"], ["3", "3", "3"])
    assert [v.correct for v in verdicts] == [True, False, False]
    assert [v.format_ok for v in verdicts] == [True, True, False]


def test_registry():
    assert verifier_for_task("arith") == "arith"
    assert {verifier_for_task(name) for name in ("gsm8k", "math500", "aime24", "aime25", "amc23")} == {"math"}
    assert verifier_for_task("my_problems.jsonl") == "math"
    with pytest.raises(RollError, match="unknown verifier 'nope'"):
        make_verifier("nope")
    with make_verifier("math") as verifier:
        assert verifier.name == "math" and verifier.version.startswith("math-verify 0.")
    with pytest.raises(RollError, match="completions but"):
        make_verifier("arith").verify_many(["a"], [])


# ------------------------------------------------------------------------------------------- extraction


@pytest.mark.parametrize("completion, expected", [
    (r"first \boxed{1} then \boxed{2}", "2"),  # the last box wins
    (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{1}{\sqrt{2}}"),  # nested braces kept
    (r"\fbox{7}", "7"),
    (r"\boxed {\{1,2\}}", r"\{1,2\}"),  # escaped braces are not structure
    (r"\boxed{3} and then \boxed{4", "3"),  # a box cut off by the token limit does not count
    ("We get 5.\nFinal Answer: $\\frac{1}{2}$.", r"\frac{1}{2}"),
    ("answer: 3\nwait\n**Answer:** 4", "4"),  # the last answer line
    (r"\boxed{5}" + "\nanswer: 6", "5"),  # a box beats an answer line
    ("the answer is five", None),
    ("answer:   ", None),
    # the endings real models write without a box (issue 13)
    ("Janet sells 16 - 3 - 4 = 9 eggs.\n#### 18", "18"),  # GSM8K's reference style
    ("So 3 + 4 = 7, and 7 * 2 = 14.\nThe answer is 72.", "72"),
    ("The final answer is $\\frac{1}{2}$.", r"\frac{1}{2}"),
    ("Adding up.\n\n**Final Answer**\n72", "72"),
    ("**Final Answer**\n$\\boxed{12}$", "12"),
    ("Checking each option.\n(C) 12", "12"),  # a multiple-choice line: its value
    ("The answer is 5.\n#### 6", "6"),  # whichever ending comes last
    (r"so \boxed{}", None),  # an empty box is no answer
    (r"\boxed{5}, or maybe \boxed{ }", "5"),  # ... and does not hide an earlier one
    ("The answer is 12.\n#### Verification\nIt checks out.", "12"),  # a Markdown heading is not an answer
    ("The answer is 12 apples because 3 * 4 = 12.", "12 apples"),  # the sentence ends the answer
    ("So the answer is 5, clearly.", "5"),
    ("(A) 3 (B) 4 (C) 5", None),  # options listed, none chosen
])
def test_extract_math_answer(completion, expected):
    assert extract_math_answer(completion) == expected


def test_extraction_is_linear_on_hostile_text():
    text = "\\boxed{" * 20_000 + "\n" * 20_000 + "{" * 20_000  # unclosed boxes, blank lines, open braces
    start = time.perf_counter()
    assert extract_math_answer(text) is None and extract_boxed(text) is None
    assert time.perf_counter() - start < 1.0


# ----------------------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("gold, answer, correct", [
    (r"\frac{1}{2}", r"\frac{1}{2}", True),
    (r"\frac{1}{2}", "1/2", True),
    (r"\frac{1}{2}", "0.5", True),
    (r"\frac{1}{2}", r"\dfrac12", True),
    ("0.5", r"\frac{1}{2}", True),
    ("3", "x=3", True),
    ("x=3", "3", True),
    ("1000", "1,000", True),
    ("1,000", "1000", True),
    (r"10,\!080", "10080", True),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3, \pi/2)", True),
    (r"\text{(C)}", "C", True),
    ("90^\\circ", "90", True),
    ("18", "18 dollars", True),  # a trailing unit is dropped ...
    ("1000", "1,000 square feet", True),
    ("5", "5 cm^2", True),
    ("6", "6 pi", False),  # ... a symbol is not
    (r"\frac{1}{2}", r"\frac{1}{3}", False),
    ("1000", "1,001", False),
    ("3", "x=4", False),
    (".0000672", ".0000673", False),  # compared to the gold's own 7 places, not math-verify's default 6
    (".0000672", "0.0000672", True),
])
def test_equivalent_forms(math_verifier, gold, answer, correct):
    [verdict] = math_verifier.verify_many([f"The answer is \\boxed{{{answer}}}."], [gold])
    assert (verdict.correct, verdict.extracted_answer, verdict.format_ok, verdict.error) == \
        (correct, answer, True, "")


def test_answer_line_and_missing_format(math_verifier):
    verdicts = math_verifier.verify_many(["so\nanswer: 1/2", "I think it is 1/2", r"\boxed{}"],
                                         [r"\frac{1}{2}"] * 3)
    # an empty box is no answer: no format credit either (issue 13)
    assert [(v.correct, v.format_ok) for v in verdicts] == [(True, True), (False, False), (False, False)]


# ------------------------------------------------------------------------ what reasoning models write (issue 21)
# Realistic endings in four styles, each with its gold answer and the verdict a careful human grader gives:
# whatever the code does, the verdict column is what a person reading the completion would mark. Hard
# negatives included: a right box inside <think> but a wrong answer after it, a right box retracted for a wrong
# one, thousands separators that change the value. Before issue 21 the verifier agreed on 51 of these 86.
GSM_JANET = ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
             "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer's market.\n")
R1_THINK = ("<think>\nOkay, let's see. Janet's ducks lay 16 eggs per day. She eats 3 and bakes with 4, so "
            "16 - 3 - 4 = 9 eggs left. She sells each for $2, so 9 * 2 = 18.\n")
R1_OPTIONS = "<think>\nOption A gives 10, B gives 11, C gives 12, which matches.\n</think>\n\n"
LLAMA_STEPS = ("## Step 1: Find the eggs left to sell\nJanet's ducks lay 16 eggs; she uses 3 + 4 = 7, leaving "
               "16 - 7 = 9.\n\n## Step 2: Multiply by the price\n9 eggs at $2 each is 9 * 2 = 18 dollars.\n\n")
QWEN_FIX = ("So the answer is $\\boxed{12}$.\n\nWait, I made an error: she also buys 2 more, so the total is "
            "12 + 2 = 14. The answer is 14.")
QWEN_MISREAD = ("The value of $x$ is $\\boxed{8}$.\n\nHmm, actually I misread the question: it asks for $x + 5$, "
                "which is $8 + 5 = 13$.\n\n**Final Answer:** 13")
R1_GUESS = ("<think>\nFirst guess: \\boxed{12}? No wait, I forgot the 4 she found later, so 10 + 4 = 14.\n"
            "</think>\n\nThe total is 10 + 4 = 14.\n\n**Final Answer:** 14")
R1_LEFT = ("<think>\nShe spends 14 dollars, so the answer should be \\boxed{14}. Hmm, but the question asks what is "
           "left.\n</think>\n\nAfter paying, she has 20 - 14 = 6 dollars left.\n\nThe answer is 6.")
R1_COST = "<think>\n12 * 90 = 1080.\n</think>\n\n### Final Answer\n\nThe total cost is $1,080."
R1_SUM = "<think>\nLet me add: 17 + 25 = 42.\n</think>\n\n**Final Answer**\nThe total is 42."
CHAIRS = "**Step 2:** 12 chairs at $90 each cost 12 × 90 = $1,080.\n\nThe answer is $1,080."
AREA = "**Step 3:** The area is 40 × 25 = 1,000 square feet.\n\nThe answer is 1,000."
GARDEN = "**Step 2:** The garden is 125 × 100 = 12,500 square feet.\n\nThe answer is 12,500 square feet."
APPLES = "**Step 2:** She picks 6 × 3 = 18 apples.\n\n**Final Answer:** She has 18 apples."
TOTAL = "**Step 2:** 17 + 25 = 42.\n\n**Final Answer** The total is 42."
OPTION_LINE = "Checking each option.\n(C) 12"
POSITIVE = "Comparing the options, only B gives a positive product.\n\nAnswer: B"
TOYS = "The factory makes 250 * 4 = 1,000 toys.\nThe answer is 1,000."
CLIPS = "Natalia sold 48/2 = 24 clips in May. Altogether she sold 48 + 24 = 72 clips.\n"

REASONING_ENDINGS = [  # (completion, gold, human verdict, style)
    # --- Qwen2.5-Math: a box at the end, "The final answer is $\boxed{…}$" ----------------------------------
    ("To find the total, we compute $3 \\times 4 = 12$.\n\nTherefore, the answer is $\\boxed{12}$.", "12", True,
     "qwen"),
    ("To find the total, we compute $3 \\times 4 = 12$.\n\nTherefore, the answer is $\\boxed{12}$.", "13", False,
     "qwen"),
    ("Simplifying, $\\frac{3}{6} = \\frac{1}{2}$.\n\nThe final answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}",
     True, "qwen"),
    ("The probability is $\\frac{5}{10}$.\n\nThe final answer is $\\boxed{0.5}$.", "\\frac{1}{2}", True, "qwen"),
    ("Solving $2x + 1 = 7$ gives $x = \\boxed{3}$.", "3", True, "qwen"),
    ("Converting to polar coordinates, we get $\\boxed{(3, \\frac{\\pi}{2})}$.",
     "\\left( 3, \\frac{\\pi}{2} \\right)", True, "qwen"),
    ("Thus, Janet makes \\(\\boxed{18}\\) dollars every day at the farmers' market.", "18", True, "qwen"),
    ("So the total cost is $\\boxed{1,080}$ dollars.", "1080", True, "qwen"),
    ("The final answer is $\\boxed{1,000,000}$.", "1000", False, "qwen"),
    ("The final answer is $\\boxed{18}$.\n\nWait, let me double-check: 16 - 3 - 4 = 9 eggs, and 9 * 2 = 18. "
     "Yes, that's correct.", "18", True, "qwen"),
    (QWEN_FIX, "12", False, "qwen"),  # the right box, taken back for a wrong answer
    (QWEN_FIX, "14", True, "qwen"),
    ("Hence the answer is $\\boxed{12}$. Actually, let me recompute: 5 * 3 = 15, not 12. So the final answer "
     "is $\\boxed{15}$.", "15", True, "qwen"),
    ("Checking each choice, only (C) satisfies the equation, so the correct option is $\\boxed{C}$.",
     "\\text{(C)}", True, "qwen"),
    ("Checking each choice, only (B) satisfies the equation, so the answer is $\\boxed{B}$.", "\\text{(C)}",
     False, "qwen"),
    ("Therefore, the length of the diagonal is $\\boxed{10\\sqrt{2}}$.", "10\\sqrt{2}", True, "qwen"),
    ("Therefore, the length of the diagonal is $\\boxed{10\\sqrt{3}}$.", "10\\sqrt{2}", False, "qwen"),
    ("Putting it all together, the answer is $\\boxed{}$.", "7", False, "qwen"),
    ("The answer is $\\boxed{18}$.\n\nLet me verify: 9 eggs at $2 each is $18. The answer is 18.", "18", True,
     "qwen"),
    (QWEN_MISREAD, "13", True, "qwen"),
    (QWEN_MISREAD, "8", False, "qwen"),

    # --- DeepSeek-R1: <think> … </think>, then a summary (the opening <think> is often in the prompt) -------
    (R1_THINK + "So the answer is 18.\n</think>\n\nJanet has 9 eggs left to sell at $2 each.\n\n**Final Answer**\n"
     "\\[\n\\boxed{18}\n\\]", "18", True, "r1"),
    (R1_THINK + "So the answer is \\boxed{18}.\n</think>\n\nShe sells 9 eggs at $3 each.\n\n**Final Answer**\n"
     "\\boxed{27}", "18", False, "r1"),
    (R1_GUESS, "14", True, "r1"),  # a box inside <think> is not the final answer ...
    (R1_GUESS, "12", False, "r1"),
    (R1_LEFT, "14", False, "r1"),  # ... even when it is the gold
    (R1_LEFT, "6", True, "r1"),
    (R1_THINK + "So it's \\boxed{18}.\n</think>\n\nJanet makes $20 every day at the farmers' market.", "18", False,
     "r1"),
    (R1_THINK + "So the answer is 42... wait, 6 * 7 = 42, yes.\n</think>\n\nThe total number of apples is 42.",
     "42", True, "r1"),
    (R1_THINK + "So the answer is \\boxed{18}.\n</think>", "18", True, "r1"),  # nothing after: its reasoning
    (R1_THINK + "</think>\n\nSo, the final answer is **18**.", "18", True, "r1"),
    (R1_THINK + "</think>\n\nJanet makes **\\$18** per day at the farmers' market.", "18", True, "r1"),
    (R1_SUM, "42", True, "r1"),
    (R1_SUM, "24", False, "r1"),
    ("<think>\nHe has 5 packs of 4 cards, so 20; he needs 32, so 12 more.\n</think>\n\n### Final Answer\n"
     "John needs to buy \\(\\boxed{12}\\) more cards.", "12", True, "r1"),
    (R1_COST, "1080", True, "r1"),
    (R1_COST, "108", False, "r1"),
    ("<think>\n1000 * 1000 = 1,000,000.\n</think>\n\n**Final Answer:** The answer is 1,000,000.", "1000", False,
     "r1"),
    (R1_OPTIONS + "The correct option is (C).", "C", True, "r1"),
    (R1_OPTIONS + "The correct option is (B).", "C", False, "r1"),
    (R1_OPTIONS + "**Answer:** (C)", "\\text{(C)}", True, "r1"),
    ("<think>\nTwo of the four outcomes are heads, so 2/4.\n</think>\n\nThe probability is "
     "$\\boxed{\\dfrac{1}{2}}$.", "\\frac{1}{2}", True, "r1"),
    ("<think>\nOkay, so 120 total. Wait, no: the question asks for the difference, so 120 - 45 = 75.\n</think>\n\n"
     "The difference is 120 - 45 = 75.\n\n\\[\n\\boxed{75}\n\\]", "75", True, "r1"),
    ("<think>\nThe answer is 72.\n</think>\n\nNatalia sold 48 + 24 = 70 clips.\n#### 70", "72", False, "r1"),
    ("<think>\nShe sold 48 in April and half as many, 24, in May: 48 + 24 = 72.\n</think>\n\n"
     "Natalia sold 48 + 24 = 72 clips altogether in April and May.", "72", True, "r1"),

    # --- Llama-3: "## Step N" / "**Step N:**", "The final answer is: $\boxed{…}$", "The answer is …" ---------
    (LLAMA_STEPS + "The final answer is: $\\boxed{18}$", "18", True, "llama"),
    (LLAMA_STEPS + "The final answer is: $\\boxed{18}$", "20", False, "llama"),
    ("**Step 1:** Janet's ducks lay 16 eggs.\n**Step 2:** She uses 7, leaving 9.\n**Step 3:** 9 × $2 = $18.\n\n"
     "The answer is 18.", "18", True, "llama"),
    (AREA, "1000", True, "llama"),
    (AREA, "1", False, "llama"),  # the thousands separator is inside the number
    (CHAIRS, "1080", True, "llama"),
    (CHAIRS.replace("$", "\\$"), "1080", True, "llama"),
    (CHAIRS, "1", False, "llama"),
    ("**Step 2:** Each ticket costs 37 / 2 = $18.50.\n\nThe answer is $18.50.", "18.5", True, "llama"),
    ("## Step 3: Add the amounts\n500 + 750 = 1,250.\n\nThe final answer is: $\\boxed{1,250}$", "1250", True,
     "llama"),
    (GARDEN, "12500", True, "llama"),
    (GARDEN, "12", False, "llama"),
    ("**Step 2:** Each share is 5 / 2 = 2,5 liters.\n\nThe answer is 2,5.", "2", False, "llama"),
    (POSITIVE, "B", True, "llama"),
    (POSITIVE, "C", False, "llama"),
    ("Substituting each option, the equation holds for (C) only. The answer is (C).", "\\text{(C)}", True,
     "llama"),
    ("Substituting each option, the equation holds for (C) only. The correct option is (C).", "C", True, "llama"),
    ("Comparing the options, only one is positive.\n\n(B)", "B", True, "llama"),
    (OPTION_LINE, "C", True, "llama"),  # an option line answers with its letter and with its value
    (OPTION_LINE, "12", True, "llama"),
    (OPTION_LINE, "D", False, "llama"),
    (APPLES, "18", True, "llama"),
    (APPLES, "17", False, "llama"),
    (TOTAL, "42", True, "llama"),
    (TOTAL, "24", False, "llama"),
    ("## Step 2: Multiply\n8 × 9 = 72.\n\n### Final Answer\n72", "72", True, "llama"),
    (LLAMA_STEPS + "The final answer is: $\\boxed{12}$\n\nHowever, I made a mistake in Step 2: the price is $2, "
     "so 7 × 2 = 14. The correct answer is 14.", "12", False, "llama"),

    # --- GSM8K: "#### 72", "The answer is 1,000." ----------------------------------------------------------
    (GSM_JANET + "#### 18", "18", True, "gsm8k"),
    (GSM_JANET + "#### 17", "18", False, "gsm8k"),
    ("The factory makes 250 * 4 = <<250*4=1000>>1,000 toys.\n#### 1,000", "1000", True, "gsm8k"),
    ("The chairs cost 12 * 90 = <<12*90=1080>>1,080 dollars.\n#### 1,080", "108", False, "gsm8k"),
    (CLIPS + "The answer is 72.", "72", True, "gsm8k"),
    (CLIPS + "**The answer is 72.**", "72", True, "gsm8k"),
    (TOYS, "1000", True, "gsm8k"),
    (TOYS, "1", False, "gsm8k"),
    ("She saves 1,000 * 10 = 10,000 dollars.\nThe answer is 10,000.", "10", False, "gsm8k"),
    ("The chairs cost 12 * 90 = $1,080.\nThe answer is $1,080.", "1080", True, "gsm8k"),
    ("The rent is 1,000 dollars a month.\nThe answer is 1,000 dollars.", "1000", True, "gsm8k"),
    ("So she has 3 + 4 = 7 apples.\nThe answer is 7 apples.", "7", True, "gsm8k"),
    ("The pool holds 1,500 gallons.\nThe answer is 1,500.\n#### 1500", "1500", True, "gsm8k"),
    ("The car travels 60 * 2.5 = 150 miles.\nThe answer is 150 miles, because speed times time is distance.",
     "150", True, "gsm8k"),
]


@pytest.fixture(scope="module")
def reasoning_verdicts(math_verifier):
    return math_verifier.verify_many([c for c, *_ in REASONING_ENDINGS], [g for _, g, *_ in REASONING_ENDINGS])


def test_reasoning_table_shape():
    assert len(REASONING_ENDINGS) >= 60
    assert {style for *_, style in REASONING_ENDINGS} == {"qwen", "r1", "llama", "gsm8k"}
    assert sum(not human for _, _, human, _ in REASONING_ENDINGS) >= 25  # hard negatives, not only positives
    assert len({(c, g) for c, g, *_ in REASONING_ENDINGS}) == len(REASONING_ENDINGS)


@pytest.mark.parametrize("index", range(len(REASONING_ENDINGS)))
def test_reasoning_ending(reasoning_verdicts, index):
    completion, gold, human, style = REASONING_ENDINGS[index]
    verdict = reasoning_verdicts[index]
    assert (verdict.correct, verdict.error) == (human, ""), \
        f"{style}: gold {gold!r}, read {verdict.extracted_answer!r} from …{completion[-80:]!r}"


def test_reasoning_endings_agreement(reasoning_verdicts):
    """Agreement with the human grader, per style and overall (printed with -s): all of them."""
    agree = {}
    for (_, _, human, style), verdict in zip(REASONING_ENDINGS, reasoning_verdicts):
        hits, total = agree.get(style, (0, 0))
        agree[style] = (hits + (verdict.correct == human), total + 1)
    print("\nagreement with a human grader: " + ", ".join(f"{s} {h}/{t}" for s, (h, t) in agree.items()))
    assert all(hits == total for hits, total in agree.values()), agree


@pytest.mark.parametrize("completion, gold, expected", [
    # after </think>: the presented answer, not a box inside the reasoning
    ("<think>\nmaybe \\boxed{3}\n</think>\nThe answer is 4.", "", "4"),
    # nothing explicit after </think>: its last line that holds a number, read by math-verify
    ("<think>\n\\boxed{3}\n</think>\n\nShe has 4 apples.\nHope this helps!", "", "She has 4 apples"),
    ("<think>\nso the answer is 3\n</think>\n\nDone!", "", "3"),  # no number after it: the reasoning's answer
    ("<think>\nso the answer is \\boxed{3}", "", "3"),  # never closed (cut off): read as a whole
    # a box stands against a later answer statement unless it was taken back in between
    ("\\boxed{5}\nSo the answer is 6.", "", "5"),
    ("\\boxed{5}\nOops, that is wrong. So the answer is 6.", "", "6"),
    ("\\boxed{5}\nWait, let me check: 2 + 3 = 5. Yes.", "", "5"),  # a check that states nothing new
    ("The answer is 1,000,000.", "", "1,000,000"),
    ("The answer is 5, 6 or 7.", "", "5"),  # ", " ends the answer; a digit after the comma does not
    ("The correct answer is **14**.", "", "14"),
    ("### Final Answer\n\n\\[\n12\n\\]", "", "12"),
    ("**Final Answer** The total is 42.", "", "The total is 42"),
    ("(C) 12", "\\text{(C)}", "C"),  # an option answers with its letter when the gold is a letter
    ("The answer is (C) 12.", "7", "12"),
    ("Putting it together, the answer is $\\boxed{}$.", "", None),  # an empty box is no answer anywhere
])
def test_final_answer_precedence(completion, gold, expected):
    assert extract_math_answer(completion, gold) == expected


def test_extraction_is_linear_on_long_lines():
    """A line of spaces after "the answer is 1" took 11 s at 2,000 spaces (cubic backtracking) before."""
    texts = ["the answer is 1" + " " * 50_000 + "x", "the answer is" + " " * 50_000 + ":" + " " * 50_000,
             "#### 1" + " " * 50_000 + "x", "**Final Answer**" + "\n" * 50_000, "(C)" + " " * 50_000 + "(",
             "\\boxed{5}\nwait\n" + "answer: 6\n" * 20_000, "</think>" * 20_000, "the answer is " + "1," * 50_000]
    start = time.perf_counter()
    for text in texts:
        extract_math_answer(text)
    assert time.perf_counter() - start < 2.0


# ------------------------------------------------------------------------------------------- time bound


def _check_hang_verdicts(verdicts, wall_s: float) -> None:
    hang, after = verdicts
    assert (hang.correct, hang.format_ok, hang.error) == (False, True, f"timeout after {BOUND_S:g} s")
    assert BOUND_S * 1000 <= hang.milliseconds < (BOUND_S + SLACK_S) * 1000
    assert after.correct and after.error == ""  # the killed worker was replaced and the batch went on
    assert wall_s < 30  # two worker start-ups (one replacement) plus the bound, on a slow shared machine


def _verify_hang() -> tuple[list, float]:
    start = time.perf_counter()
    with MathVerifier(timeout_s=BOUND_S, workers=1) as verifier:  # one worker: the next answer needs a fresh one
        verdicts = verifier.verify_many([HANG, r"\boxed{5}"], ["5", "5"])
    return verdicts, time.perf_counter() - start


def test_hang_is_bounded_on_the_main_thread():
    _check_hang_verdicts(*_verify_hang())


def test_hang_is_bounded_on_another_thread():
    out = {}
    thread = threading.Thread(target=lambda: out.update(result=_verify_hang()))
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    _check_hang_verdicts(*out["result"])


def test_hang_is_bounded_in_a_subprocess():
    code = (
        "import json, time\n"
        "from roll.verifiers import MathVerifier\n"
        f"with MathVerifier(timeout_s={BOUND_S}, workers=1) as v:\n"
        "    start = time.perf_counter()\n"
        f"    [verdict] = v.verify_many([{HANG!r}], ['5'])\n"
        "print(json.dumps([verdict.correct, verdict.error, verdict.milliseconds, time.perf_counter() - start]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    correct, error, milliseconds, wall_s = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (correct, error) == (False, f"timeout after {BOUND_S:g} s")
    assert BOUND_S * 1000 <= milliseconds < (BOUND_S + SLACK_S) * 1000 and wall_s < 30


def test_a_killed_caller_leaves_no_worker_running():
    """kill -9 of the calling process mid-hang: the worker's own CPU budget (bound + 2 s) ends it."""
    code = (
        "import threading, time\n"
        "from roll.verifiers import MathVerifier\n"
        f"v = MathVerifier(timeout_s={BOUND_S}, workers=1)\n"
        f"threading.Thread(target=v.verify_many, args=([{HANG!r}], ['5'])).start()\n"
        "while not (v._pool.workers and v._pool.workers[0].job):\n"
        "    time.sleep(0.05)\n"
        "print(v._pool.workers[0].process.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
    worker = int(proc.stdout.readline())
    proc.kill()
    proc.wait()
    status = Path(f"/proc/{worker}/status")

    def cpu_seconds() -> float:  # the worker's utime + stime (fields 14 and 15 of /proc/PID/stat)
        try:
            fields = Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # gone (reaped)
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def running() -> bool:
        try:
            return "State:\tZ" not in status.read_text()
        except FileNotFoundError:
            return False

    # The budget is CPU time, not wall time: on a loaded machine the worker may get a third of a core. Its
    # limit is at most the CPU it had used when its job began (≤ what it has now) + the bound + the slack;
    # allow one more second for the tick-granular check and the signal. The wall-clock cap only guards a hang.
    budget = cpu_seconds() + BOUND_S + CPU_SLACK_S + 1
    wall_deadline = time.monotonic() + 300
    while running() and cpu_seconds() <= budget and time.monotonic() < wall_deadline:
        time.sleep(0.1)
    still_running = running()
    if still_running:
        os.kill(worker, signal.SIGKILL)  # leave no orphan behind, even when failing
    assert not still_running, "orphaned worker still running"


def test_one_verifier_shared_by_threads(math_verifier):
    results = {}

    def work(name: str, answer: str) -> None:
        results[name] = math_verifier.verify_many([f"\\boxed{{{answer}}}"] * 20, ["7"] * 20)

    threads = [threading.Thread(target=work, args=(str(n), str(n))) for n in (6, 7, 8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert {name: sum(v.correct for v in verdicts) for name, verdicts in results.items()} == \
        {"6": 0, "7": 20, "8": 0}


def test_50kb_answer_is_bounded():
    huge = r"\boxed{" + "x^{2}+" * 8_000 + "1}"  # 48 kB: SymPy's LaTeX parser grinds on it for minutes
    with make_verifier("math", timeout_s=BOUND_S, workers=1) as verifier:  # default: refused outright
        [verdict] = verifier.verify_many([huge], ["1"])
    assert (verdict.correct, verdict.error) == (False, "answer too long (48001 > 1000 characters)")
    assert verdict.milliseconds < 1000
    with MathVerifier(timeout_s=BOUND_S, workers=1, max_answer_chars=10**6) as verifier:  # no cap: timed out
        [verdict] = verifier.verify_many([huge], ["1"])
    assert (verdict.correct, verdict.error) == (False, f"timeout after {BOUND_S:g} s")
    assert verdict.milliseconds < (BOUND_S + SLACK_S) * 1000


# ---------------------------------------------------------------------------------- gold vs perturbed


def test_gold_and_perturbed_on_a_sample(math_verifier):
    """40 random problems per dataset: every gold answer judged right, every perturbed one judged wrong.

    The full-data bench (bench/verifier_accuracy.py) measures 100% on both over all 9,392 problems; on a
    sample of 40 the only threshold consistent with >= 99.5% is zero failures.
    """
    perturb = _bench().perturb
    rng = random.Random(0)
    for name in DATASETS:
        records = dataset_records(name)
        golds = [str(r["answer"]) for _, r in rng.sample(records, min(40, len(records)))]
        wrong = [perturb(g) for g in golds]
        on_gold = math_verifier.verify_many([f"The answer is \\boxed{{{g}}}." for g in golds], golds)
        on_wrong = math_verifier.verify_many([f"The answer is \\boxed{{{w}}}." for w in wrong], golds)
        assert [g for g, v in zip(golds, on_gold) if not v.correct] == [], name
        assert [w for w, v in zip(wrong, on_wrong) if v.correct] == [], name
        assert not any(v.error for v in on_gold + on_wrong), name


def test_perturb():
    perturb = _bench().perturb
    assert [perturb(g) for g in ("41", "-3", r"\frac{3}{56}", ".0000672", r"\text{(C)}", r"\pi")] == \
        ["42", "-2", r"\frac{4}{56}", ".0000673", r"\text{(D)}", r"\pi + 1"]


# -------------------------------------------------------------------------------------------- datasets


def test_bundled_files_match_their_checksums():
    table = (DATA_DIR / "SOURCES.md").read_text()
    listed = dict(re.findall(r"^\| `([\w/]+\.jsonl)` \| \d+ \| \d+ \| `([0-9a-f]{64})` \|$", table, re.MULTILINE))
    files = {str(path.relative_to(DATA_DIR)) for splits in DATASETS.values() for path in splits.values()}
    assert set(listed) == files
    for name, digest in listed.items():
        assert hashlib.sha256((DATA_DIR / name).read_bytes()).hexdigest() == digest, name


@pytest.mark.parametrize("name, counts", [
    ("gsm8k", {"train": 7473, "test": 1319}), ("math500", {"test": 500}), ("aime24", {"test": 30}),
    ("aime25", {"test": 30}), ("amc23", {"test": 40}),
])
def test_dataset_rows(name, counts):
    rows = dataset_rows(name)
    assert {s: sum(r["split"] == s for r in rows) for s in counts} == counts and len(rows) == sum(counts.values())
    assert len({r["prompt_id"] for r in rows}) == len(rows)
    assert all(r["task"] == name and r["answer"].strip() for r in rows)
    first = rows[0]
    assert first["prompt"].startswith("Solve the problem. Put the final answer in \\boxed{}.\n\nProblem: ")
    assert first["prompt"].endswith("\nSolution:")
    assert json.loads(first["metadata"])["chat_template"] is False


def test_dataset_prompts_use_a_chat_template():
    from roll.policy import build_default_tokenizer

    tokenizer = build_default_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    table = build_prompts("aime25", tokenizer=tokenizer)
    row = table.to_pylist()[0]
    problem = dataset_records("aime25")[0][1]["problem"]
    instruction = "Solve the problem. Put the final answer in \\boxed{}."
    assert row["prompt"] == f"<|user|>{instruction}\n\n{problem}\n<|assistant|>"
    assert json.loads(row["metadata"]) == {"source_id": "aime-2025-I-1", "chat_template": True, "year": 2025,
                                           "contest": "AIME I", "problem_number": 1}
    assert table.num_rows == 30 and row["answer"] == "70"


def test_build_prompts_knows_the_datasets():
    table = build_prompts("gsm8k")
    assert table.num_rows == 8792 and set(table.column("split").to_pylist()) == {"train", "test"}
    with pytest.raises(RollError, match="gsm8k, math, math500, aime24, aime25, amc23"):
        build_prompts("gsm9k")
