"""Verifiers: a completion and its ground-truth answer in, a `Verdict` out.

Two verifiers, picked by name:

* `arith` — the embedded task: the integer on the completion's final `answer: N` line, compared exactly.
* `math`  — real datasets (GSM8K, MATH-500, AIME, AMC): the completion's final answer (below), compared with
  the ground truth by math-verify, so that `\\frac{1}{2}`, `1/2`, `0.5` and `\\dfrac12` are one answer, as are
  `x=3` and `3`, `1,000` and `1000`, `$1,080` and `1080` (and, once a trailing unit is dropped, `18 dollars`
  and `18`).

The final answer, the way a human grader reads a completion (home-made code only finds the span; math-verify
reads it):

1. **Reasoning block.** With a `</think>`, the answer is the one the text after the last `</think>` gives by
   rules 2–3; if it states none, its last line that holds a number, whose last value math-verify takes
   (`Janet makes $18 a day.`: the summary is the presented answer); only if nothing after `</think>` holds a
   number, the reasoning block's own answer by rules 2–3.
   Without `</think>` (none, or a reasoning block cut off) the whole completion is read by rules 2–3.
2. **Box.** The last non-empty `\\boxed{…}` / `\\fbox{…}` — unless the model takes it back: a retraction word
   after the box (wait, hmm, oops, actually, mistake, error, wrong, incorrect, correction, misread,
   recalculate/recompute/re-evaluate/reconsider/recheck/redo) followed by an explicit answer statement (rule
   3) makes that statement's answer final (`\\boxed{12}. Wait, I made an error … so the answer is 14.` reads
   14). A later statement with no retraction between does not override the box, nor does a retraction that
   states no new answer (`Wait, let me double-check … yes.`).
3. **Explicit answer statements**, whichever ends last: a `#### 72` line; an `answer: …` / `Final Answer: …`
   line; a `**Final Answer**` / `### Final Answer` heading with its answer on the same or the next line (a
   value, or a sentence such as `She has 18 apples.`, whose value math-verify finds); `The (final | correct |
   right) (answer | option | choice) is …` with a value (`1,000`, `$1,080` and `**14**` whole: a comma followed by
   a digit is part of the number) or an option letter; an option `(C)` / `(C) 12` as the last line.
   Nothing else (`the total is 14`, `the answer is five`) is an answer statement.

An option `(C) 12` answers with its letter when the gold is a letter (`C`, `\\text{(C)}`), else with its
value. An empty box is no answer.

Model output is never run as code. math-verify parses LaTeX into SymPy and compares symbolically; a hostile
or unlucky answer (`\\boxed{9^{9^{9^{9}}}}`) can make SymPy compute for hours. math-verify's own timeout is
SIGALRM, which only works on the main thread of the main interpreter, so the math verifier instead runs
math-verify in worker processes it owns (`roll/workers.py`, shared with `roll verify --reward`): each answer
gets a deadline, and a worker that misses it is killed, the answer is recorded as wrong with
`error="timeout after X s"`, and a fresh worker takes its place. That
bound holds whichever thread or process calls `verify_many`. Each worker also carries a kernel CPU budget per
answer, so a stage killed outright leaves no worker computing on.

    with make_verifier("math", timeout_s=5.0, workers=2) as verifier:
        verdicts = verifier.verify_many(completions, answers)
"""
from __future__ import annotations

import importlib.metadata
import re
import time
from dataclasses import dataclass

from roll.errors import RollError
from roll.tasks import ARITH, CHAIN, extract_arith_answer
from roll.workers import WorkerPool, serve, start_worker

MAX_ANSWER_CHARS = 1000  # longest MATH-500 answer is 53 characters; longer "answers" are junk or attacks
MATH_RULES = 2  # bump when extraction or comparison rules change, so old and new verdicts can be told apart


@dataclass(frozen=True)
class Verdict:
    """One completion judged against its ground truth."""

    correct: bool
    extracted_answer: str  # "" when no answer was found
    format_ok: bool  # an answer was found (a box, an answer statement, or the summary after </think>)
    error: str  # "" when none; else why the verifier could not judge (timeout, bad ground truth, ...)
    milliseconds: float

    @property
    def reward(self) -> float:
        return 1.0 if self.correct else 0.0


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


# ------------------------------------------------------------------------------------------------- arith


def verify_arith(completion: str, answer: str) -> Verdict:
    """Exact integer comparison of the completion's final `answer: N` line with `answer`."""
    start = time.perf_counter()
    try:
        extracted = extract_arith_answer(completion)
    except ValueError:  # more digits than Python will convert (sys.get_int_max_str_digits)
        return Verdict(False, "", False, "answer has too many digits", _ms_since(start))
    try:
        gold, error = str(int(answer.strip())), ""
    except ValueError:
        gold, error = None, f"ground truth {answer[:50]!r} is not an integer"
    correct = extracted is not None and extracted == gold
    return Verdict(correct, extracted or "", extracted is not None, error, _ms_since(start))


# ------------------------------------------------------------------------------------- math: extraction
# Pure string work in the calling process, linear in the completion's length (no backtracking regexes), so
# that only math-verify itself needs the time bound. This code only finds WHERE the answer is; what the span
# means (a number with thousands separators or a currency sign, a fraction, a value inside a sentence) is
# math-verify's job in the worker.

BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
BRACE_TOKEN_RE = re.compile(r"\\.|[{}]", re.DOTALL)  # an escaped char (\{, \}, \\) is not a brace
ANSWER_LINE_RE = re.compile(r"^[ \t*#>_]*(?:final[ \t]+)?answer[ \t*]*:(.*)$", re.IGNORECASE | re.MULTILINE)
DECIMALS_RE = re.compile(r"\.(\d+)")
FLOAT_PLACES = 6  # math-verify's default float rounding
# "18 dollars", "1,000 square feet", "5 cm^2": a number, a space, then only words (a unit). math-verify reads
# some units and not others; the number is the answer. Symbols stay (6 pi is not 6), as does "5x".
UNIT_SUFFIX_RE = re.compile(r"(\\?\$?-?\d[\d,]*(?:\.\d+)?)\s+([A-Za-z]{2,}(?:\s+[A-Za-z]{2,})*(?:\^[23])?)")
NOT_UNITS = {"pi", "sqrt", "times", "cdot"}
MATH_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
THINK_END = "</think>"  # DeepSeek-R1 / QwQ / Qwen3: the reasoning block ends here, the presented answer follows
# Words with which a model takes back what it just wrote ("Wait, I made an error", "Actually, ...",
# "let me recalculate"). Only used between a box and a LATER explicit answer statement, so a "Wait, let me
# double-check ... yes" after a box that states nothing new changes nothing.
RETRACTION_RE = re.compile(r"\b(?:wait|hmm+|oops|actually|mistakes?|errors?|wrong|incorrect|correction|misread"
                           r"|re-?(?:calculat|comput|evaluat|consider|check|do)\w*)\b", re.IGNORECASE)
# An option as an answer: "(C)", or "(C) 12" (its letter and its value).
OPTION_RE = re.compile(r"\(([A-E])\)[ \t]*:?[ \t]*([^\n]*)")
# A gold that is an option letter: "C", "(C)", "\text{(C)}", "\textbf{C}".
LETTER_GOLD_RE = re.compile(r"\s*(?:\\(?:text|textbf|mathrm)\s*\{\s*)?\(?([A-E])\)?\s*\}?\s*")
# A span that is a sentence ("She has 18 apples", "The total is 42"), not a value: math-verify finds the value
# in it (see `_parse_prose`); boxing a sentence would make SymPy read every letter as a symbol.
PROSE_RE = re.compile(r"[A-Za-z]{2,}[ \t]+\S")
HAS_DIGIT_RE = re.compile(r"\d")


def _matching_braces(text: str) -> dict[int, int]:
    """Index of each `{` that is closed -> index of its `}` (one pass with a stack)."""
    pairs, stack = {}, []
    for token in BRACE_TOKEN_RE.finditer(text):
        if token.group() == "{":
            stack.append(token.start())
        elif token.group() == "}" and stack:
            pairs[stack.pop()] = token.start()
    return pairs


def _last_box(text: str) -> tuple[str, int] | None:
    """(contents, end index) of the last closed, non-empty `\\boxed{…}` / `\\fbox{…}`, or None."""
    boxes = list(BOXED_RE.finditer(text))
    if not boxes:
        return None
    pairs = _matching_braces(text)
    for box in reversed(boxes):  # a box cut off by the token limit, or an empty one, is no answer
        open_at = box.end() - 1
        if open_at in pairs and text[open_at + 1:pairs[open_at]].strip():
            return text[open_at + 1:pairs[open_at]].strip(), pairs[open_at] + 1
    return None


def extract_boxed(text: str) -> str | None:
    """Contents of the last closed, non-empty `\\boxed{…}` / `\\fbox{…}` (nested braces kept), or None."""
    box = _last_box(text)
    return box[0] if box else None


def _strip_answer_line(content: str) -> str:
    """`**$\\frac12$.**` -> `\\frac12`: markdown emphasis, a final full stop and math delimiters go."""
    content = content.strip().strip("*").strip().rstrip(".").strip()
    for left, right in MATH_DELIMITERS:
        if len(content) > len(left) + len(right) and content.startswith(left) and content.endswith(right):
            return content[len(left):-len(right)].strip()
    return content


def normalize_answer(answer: str) -> str:
    """What math-verify is given for an extracted answer: a trailing unit dropped, otherwise unchanged."""
    match = UNIT_SUFFIX_RE.fullmatch(answer.strip())
    if match and not NOT_UNITS & set(match.group(2).lower().replace("^", " ").split()):
        return match.group(1)
    return answer


def is_letter_gold(gold: str) -> bool:
    """Whether the ground truth is a multiple-choice letter (MATH has 40 such, e.g. `\\text{(C)}`)."""
    return LETTER_GOLD_RE.fullmatch(gold or "") is not None


def _choose_option(answer: str, letter_gold: bool) -> str:
    """`(C) 12` is both an option and a value: its letter when the gold is a letter, else its value."""
    option = OPTION_RE.fullmatch(answer)
    if option is None:
        return answer
    value = option.group(2).strip().strip("*").rstrip(".").strip()
    return option.group(1) if letter_gold or not value else value


def _heading_content(text: str, match: re.Match) -> tuple[str, int] | None:
    """(span, end) that a `**Final Answer**` / `### Final Answer` heading introduces: the rest of its line, else
    the next non-blank line; a display-math opener (`\\[`, `$$`) alone on a line is skipped."""
    position, opener_seen = match.end(), False
    while position < len(text):
        end = text.find("\n", position)
        end = len(text) if end < 0 else end
        line = text[position:end].strip()
        if line and (opener_seen or line not in ("\\[", "$$")):
            return line, end
        opener_seen = opener_seen or bool(line)
        position = end + 1
    return None


def _heading_endings(text: str):
    for match in FINAL_HEADING_RE.finditer(text):
        found = _heading_content(text, match)
        if found:
            yield match.start(), found[1], found[0]


def _regex_endings(pattern: re.Pattern):
    def endings(text: str):
        for match in pattern.finditer(text):
            yield match.start(), match.end(), match.group(1)
    return endings


# `**Final Answer**`, `### Final Answer:`, or a bare `Final Answer` line: a heading whose answer follows it.
FINAL_HEADING_RE = re.compile(r"^[ \t>]*(?:(?:#{1,6}|\*\*|__)[ \t]*final[ \t]+answer\b[ \t*_:]*"
                              r"|final[ \t]+answer[ \t:]*$)", re.IGNORECASE | re.MULTILINE)
# The explicit answer statements real models write besides a box, each seen in GSM8K/MATH-style outputs. Each
# gives (start, end, span):
ENDINGS = (
    # GSM8K's reference style, "#### 72" — a value, not a Markdown heading ("#### Verification")
    _regex_endings(re.compile(r"^[ \t]*####[ \t]*([-+$\\(\[\d][^\n]*)", re.MULTILINE)),
    _regex_endings(ANSWER_LINE_RE),  # "answer: 72", "Final answer: 72", "**Answer:** 72", "**Final Answer:** …"
    _heading_endings,  # "**Final Answer**\n72", "### Final Answer\nThe total is 42.", "**Final Answer** 42"
    # "The answer is 72.", "The correct answer is **1,000**.", "The correct option is (C)." — a value (digit, sign,
    # $, \\ or bracket first) or an option letter, not prose ("the answer is five"), up to the end of the
    # sentence: "The answer is 12 apples because …" gives "12 apples". A comma followed by a digit is inside
    # the number (1,000 and $1,080, and 2,5 read whole rather than as 2); ", " ends it ("5, clearly"). No
    # `[ \t]*` beside the lazy span: that backtracked cubically on a line of spaces (2,000 spaces took 11 s).
    _regex_endings(re.compile(
        r"\bthe[ \t]+(?:(?:final|correct|right)[ \t]+)?(?:answer|option|choice)[ \t]+is[ \t]*(?::[ \t]*)?(?:\*\*)?"
        r"([-+$\\(\[\d](?:[^\n,;]|,(?=\d))*?|(?-i:[A-E])(?!\w))"
        r"(?:\.(?=[ \t]|$)|,(?!\d)|;|[ \t]because\b|$)", re.IGNORECASE | re.MULTILINE)),
    # an option "(C) 12" or "(C)" as the completion's whole last line (not options listed on one line)
    _regex_endings(re.compile(r"^[ \t*]*(\([A-E]\)[^()\n]*)\Z", re.MULTILINE)),
)


def _explicit_answer(text: str, letter_gold: bool) -> tuple[str, bool] | None:
    """(span, is prose) of the answer that `text` states explicitly, by the box and correction rules of the
    module docstring; None when it states none."""
    statements = []  # (end, start, span): the last one to end is the latest statement
    for endings in ENDINGS:
        for start, end, span in endings(text):
            span = _strip_answer_line(span.rstrip(" \t*."))
            if span and not (BOXED_RE.search(span) and extract_boxed(span) is None):  # "is $\\boxed{}$": none
                statements.append((end, start, span))
    box = _last_box(text)
    if box is not None:
        # A box stands unless the model takes it back and then states another answer (a human grader reads
        # "\boxed{12}. Wait, I made an error ... so the answer is 14." as 14).
        retraction = RETRACTION_RE.search(text, box[1])
        corrections = [s for s in statements if retraction and s[1] >= retraction.end()]
        if not corrections:
            return _choose_option(box[0], letter_gold), False
        statements = corrections
    if not statements:
        return None
    span = _choose_option(max(statements)[2], letter_gold)
    return span, PROSE_RE.match(span) is not None


def locate_math_answer(completion: str, gold: str = "") -> tuple[str, bool] | None:
    """(span, is prose) of the completion's final answer by the rules of the module docstring, or None.
    `gold` only decides whether an option `(C) 12` answers with its letter or its value."""
    letter_gold = is_letter_gold(gold)
    reasoning, closed, presented = completion.rpartition(THINK_END)
    if not closed:
        return _explicit_answer(completion, letter_gold)
    found = _explicit_answer(presented, letter_gold)
    if found is None:  # a summary after the reasoning is the answer even unmarked: its last line with a number
        lines = [line for line in presented.splitlines() if HAS_DIGIT_RE.search(line)]
        found = (_strip_answer_line(lines[-1]), True) if lines else None
    return found or _explicit_answer(reasoning, letter_gold)


def extract_math_answer(completion: str, gold: str = "") -> str | None:
    """The span that holds the completion's final answer (module docstring), or None."""
    found = locate_math_answer(completion, gold)
    return found[0] if found else None


# ------------------------------------------------------------------------------------ math: worker side


def _parse(latex: str):
    """math-verify's parse with its signal timeout off: our parent process enforces the deadline."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    # Boxing puts both sides through the same extraction route; the gold is parsed the same way.
    return parse(f"\\boxed{{{latex}}}", extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                 parsing_timeout=None)


def _parse_prose(sentence: str):
    """The value in a sentence ("She has 18 apples", "The total cost is \\$1,080"), found by math-verify's
    own extraction (its last number or expression). An escaped dollar is a currency sign, never math."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    return parse(sentence.replace("\\$", ""), extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                 parsing_timeout=None)


def _judge(prediction: str, gold: str, prose: bool, parsed_golds: dict) -> tuple[bool, str]:
    """(correct, error) for one extracted answer (a value, or a sentence when `prose`); the gold is parsed once
    per distinct gold string."""
    from math_verify import verify

    if gold not in parsed_golds:
        if len(parsed_golds) > 100_000:  # bound the cache for very long-lived workers
            parsed_golds.clear()
        parsed_golds[gold] = _parse(gold)
    if not parsed_golds[gold]:
        return False, f"could not parse ground truth {gold[:50]!r}"
    # math-verify rounds floats to 6 decimal places, which makes .0000673 equal a gold of .0000672: compare
    # to at least as many places as the ground truth is written with.
    places = max([FLOAT_PLACES] + [len(d) for d in DECIMALS_RE.findall(gold)])
    parsed = _parse_prose(prediction) if prose else _parse(prediction)
    correct = verify(parsed_golds[gold], parsed, float_rounding=places, timeout_seconds=None)
    return bool(correct), ""


def _worker_main(timeout_s: float) -> None:
    """Worker process (roll/workers.py): reads ["prediction", "gold", prose], writes [correct, "error"]. It says
    "ready" once SymPy is imported, so the parent's per-answer clock never counts start-up."""
    import logging

    channel = start_worker()
    # The "timeout is disabled" warning is expected here (the parent keeps time), and parse failures of
    # model output are verdicts, not log lines.
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    import math_verify  # noqa: F401 - the slow SymPy import happens before we say we are ready

    parsed_golds: dict = {}
    serve(channel, lambda job: _judge(*job, parsed_golds), timeout_s, on_error=lambda error: [False, error])


# ------------------------------------------------------------------------------------ math: parent side

WORKER_COMMAND = "from roll.verifiers import _worker_main; _worker_main({timeout_s!r})"


class Verifier:
    """A named, versioned judge of completions; use as a context manager so its workers stop."""

    name = ""
    version = ""

    def verify_many(self, completions: list[str], answers: list[str]) -> list[Verdict]:
        raise NotImplementedError

    def close(self) -> None:
        """Stop any worker processes (a no-op for in-process verifiers)."""

    def __enter__(self) -> "Verifier":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @staticmethod
    def _check_lengths(completions: list[str], answers: list[str]) -> None:
        if len(completions) != len(answers):
            raise RollError(f"{len(completions)} completions but {len(answers)} answers")


class ArithVerifier(Verifier):
    """`verify_arith` over a batch; cheap and bounded, so it runs in the calling process."""

    name = ARITH
    version = "arith 1"

    def verify_many(self, completions: list[str], answers: list[str]) -> list[Verdict]:
        self._check_lengths(completions, answers)
        return [verify_arith(c, a) for c, a in zip(completions, answers)]


class MathVerifier(Verifier):
    """math-verify in `workers` processes, with a hard deadline of `timeout_s` per answer."""

    name = "math"

    def __init__(self, timeout_s: float = 5.0, workers: int = 2, max_answer_chars: int = MAX_ANSWER_CHARS):
        if timeout_s <= 0 or workers < 1:
            raise RollError(f"math verifier needs timeout_s > 0 and workers >= 1 (got {timeout_s}, {workers})")
        # Verdicts depend on our extraction rules as well as on math-verify: both are named.
        self.version = f"math-verify {importlib.metadata.version('math-verify')}, roll-math {MATH_RULES}"
        self.timeout_s, self.max_answer_chars = timeout_s, max_answer_chars
        # started on first use, so building a verifier is free
        self._pool = WorkerPool(WORKER_COMMAND.format(timeout_s=timeout_s), timeout_s, workers, "math verifier")

    def close(self) -> None:
        self._pool.close()

    def verify_many(self, completions: list[str], answers: list[str]) -> list[Verdict]:
        """One verdict per completion, each within `timeout_s` of the moment its answer reached a worker."""
        self._check_lengths(completions, answers)
        verdicts: list[Verdict | None] = [None] * len(completions)
        extracted: dict[int, str] = {}
        jobs = []
        for index, (completion, answer) in enumerate(zip(completions, answers)):
            start = time.perf_counter()
            located = locate_math_answer(completion, str(answer))
            found, prose = located if located else (None, False)
            if found is None:
                verdicts[index] = Verdict(False, "", False, "", _ms_since(start))
            elif len(found) > self.max_answer_chars:
                error = f"answer too long ({len(found)} > {self.max_answer_chars} characters)"
                verdicts[index] = Verdict(False, found[:self.max_answer_chars], True, error, _ms_since(start))
            else:
                extracted[index] = found
                jobs.append((index, [found if prose else normalize_answer(found), str(answer), prose]))
        for index, outcome in self._pool.run(jobs).items():  # a timeout or a dead worker: wrong, with the error
            correct, error = outcome.reply if outcome.reply is not None else (False, outcome.error)
            verdicts[index] = Verdict(bool(correct), extracted[index], True, error, outcome.milliseconds)
        return verdicts


# --------------------------------------------------------------------------------------------- registry

VERIFIERS = {ARITH: ArithVerifier, "math": MathVerifier}


def make_verifier(name: str, timeout_s: float = 5.0, workers: int = 2) -> Verifier:
    """The verifier called `name` ("arith" or "math"); close it (or use `with`) when done."""
    if name == ARITH:
        return ArithVerifier()
    if name == "math":
        return MathVerifier(timeout_s=timeout_s, workers=workers)
    raise RollError(f"unknown verifier '{name}' (choose from: {', '.join(VERIFIERS)})")


def verifier_for_task(task: str) -> str:
    """The verifier a task's answers need: exact integers for the built-in arith and chain (`answer: N`),
    math-verify for everything else."""
    return ARITH if task.partition(":")[0] in (ARITH, CHAIN) else "math"
