"""Verifiers: a completion and its ground-truth answer in, a `Verdict` out.

Two verifiers, picked by name:

* `arith` — the embedded task: the integer on the completion's final `answer: N` line, compared exactly.
* `math`  — real datasets (GSM8K, MATH-500, AIME, AMC): the last `\\boxed{…}` (or `\\fbox{…}`) of the
  completion, else its last `answer: …` line, compared with the ground truth by math-verify, so that
  `\\frac{1}{2}`, `1/2`, `0.5` and `\\dfrac12` are one answer, as are `x=3` and `3`, `1,000` and `1000`
  (and, once a trailing unit is dropped, `18 dollars` and `18`).

Model output is never run as code. math-verify parses LaTeX into SymPy and compares symbolically; a hostile
or unlucky answer (`\\boxed{9^{9^{9^{9}}}}`) can make SymPy compute for hours. math-verify's own timeout is
SIGALRM, which only works on the main thread of the main interpreter, so the math verifier instead runs
math-verify in worker processes it owns: each answer gets a deadline, and a worker that misses it is killed,
the answer is recorded as wrong with `error="timeout after X s"`, and a fresh worker takes its place. That
bound holds whichever thread or process calls `verify_many`. Each worker also carries a kernel CPU budget per
answer, so a stage killed outright leaves no worker computing on.

    with make_verifier("math", timeout_s=5.0, workers=2) as verifier:
        verdicts = verifier.verify_many(completions, answers)
"""
from __future__ import annotations

import collections
import importlib.metadata
import json
import multiprocessing.connection
import os
import re
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass

from roll.errors import RollError
from roll.tasks import ARITH, extract_arith_answer

MAX_ANSWER_CHARS = 1000  # longest MATH-500 answer is 53 characters; longer "answers" are junk or attacks
STARTUP_TIMEOUT_S = 120.0  # a spawned worker imports SymPy; slow on a loaded 2-core machine, never minutes
WORKER_MEMORY_BYTES = 4 << 30  # address-space cap per worker process
CPU_SLACK_S = 2  # a worker's CPU budget per answer is the time bound plus this (whole seconds)
MATH_RULES = 1  # bump when extraction or comparison rules change, so old and new verdicts can be told apart


@dataclass(frozen=True)
class Verdict:
    """One completion judged against its ground truth."""

    correct: bool
    extracted_answer: str  # "" when no answer was found
    format_ok: bool  # the completion gave its answer in the expected form (a box or an answer line)
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
# that only math-verify itself needs the time bound.

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


def _matching_braces(text: str) -> dict[int, int]:
    """Index of each `{` that is closed -> index of its `}` (one pass with a stack)."""
    pairs, stack = {}, []
    for token in BRACE_TOKEN_RE.finditer(text):
        if token.group() == "{":
            stack.append(token.start())
        elif token.group() == "}" and stack:
            pairs[stack.pop()] = token.start()
    return pairs


def extract_boxed(text: str) -> str | None:
    """Contents of the last closed, non-empty `\\boxed{…}` / `\\fbox{…}` (nested braces kept), or None."""
    boxes = list(BOXED_RE.finditer(text))
    if not boxes:
        return None
    pairs = _matching_braces(text)
    for box in reversed(boxes):  # a box cut off by the token limit, or an empty one, is no answer
        open_at = box.end() - 1
        if open_at in pairs and text[open_at + 1:pairs[open_at]].strip():
            return text[open_at + 1:pairs[open_at]].strip()
    return None


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


# The endings real models write when they do not box their answer, each seen in GSM8K/MATH-style outputs:
ENDINGS = (
    # GSM8K's reference style, "#### 72" — a value, not a Markdown heading ("#### Verification")
    re.compile(r"^[ \t]*####[ \t]*([-+$\\(\[\d][^\n]*?)[ \t]*$", re.MULTILINE),
    ANSWER_LINE_RE,  # "answer: 72", "Final answer: 72", "**Answer:** 72"
    re.compile(r"\*\*[ \t]*final[ \t]+answer[ \t]*:?[ \t]*\*\*[ \t]*:?[ \t]*\n+[ \t]*(.+)$", re.IGNORECASE | re.MULTILINE),
    # "The answer is 72." — a value (digit, sign, $, \\ or bracket first), not prose ("the answer is five")
    # up to the end of the sentence: "The answer is 12 apples because …" gives "12 apples"
    re.compile(r"\bthe[ \t]+(?:final[ \t]+)?answer[ \t]+is[ \t]*:?[ \t]*([-+$\\(\[\d][^\n,;]*?)"
               r"[ \t]*(?:\.[ \t]*$|\.[ \t]|[,;]|[ \t]+because\b|$)", re.IGNORECASE | re.MULTILINE),
    # a multiple-choice answer "(C) 12" as the completion's whole last line (not options listed on one line)
    re.compile(r"^[ \t*]*\(([A-E])\)[ \t]*([^()\n]+?)[ \t]*\Z", re.MULTILINE),
)


def extract_math_answer(completion: str) -> str | None:
    """The answer a completion gives: its last non-empty box; else the value of whichever unboxed ending
    comes last (a `#### 72` line, an `answer: …` line, `**Final Answer**` with the value on the next line,
    `The answer is 72.`, or a multiple-choice line `(C) 12`, whose value is taken); else None."""
    boxed = extract_boxed(completion)
    if boxed is not None:
        return boxed
    found = []  # (end position, answer)
    for pattern in ENDINGS:
        for match in pattern.finditer(completion):
            content = _strip_answer_line(match.group(match.lastindex))
            if content:
                found.append((match.end(), content))
    return max(found)[1] if found else None


# ------------------------------------------------------------------------------------ math: worker side


def _parse(latex: str):
    """math-verify's parse with its signal timeout off: our parent process enforces the deadline."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    # Boxing puts both sides through the same extraction route; the gold is parsed the same way.
    return parse(f"\\boxed{{{latex}}}", extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                 parsing_timeout=None)


def _judge(prediction: str, gold: str, parsed_golds: dict) -> tuple[bool, str]:
    """(correct, error) for one extracted answer; the gold is parsed once per distinct gold string."""
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
    correct = verify(parsed_golds[gold], _parse(prediction), float_rounding=places, timeout_seconds=None)
    return bool(correct), ""


def _worker_main(timeout_s: float) -> None:
    """Worker process, one JSON line per message: reads ["prediction", "gold"], writes [correct, "error"].

    It says "ready" once SymPy is imported, so the parent's per-answer clock never counts start-up, and
    exits at end of input (the parent closed the pipe or died).
    """
    import logging
    import resource  # Unix only, like the rest of the worker machinery
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which then stops us
    _lower_limit(resource.RLIMIT_AS, WORKER_MEMORY_BYTES)  # a runaway SymPy number fails, not the host
    replies = os.fdopen(os.dup(1), "w")  # the protocol owns stdout; a stray print() goes to stderr
    os.dup2(2, 1)
    # The "timeout is disabled" warning is expected here (the parent keeps time), and parse failures of
    # model output are verdicts, not log lines.
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    import math_verify  # noqa: F401 - the slow SymPy import happens before we say we are ready

    def reply(message) -> None:
        replies.write(json.dumps(message) + "\n")
        replies.flush()

    reply("ready")
    parsed_golds: dict = {}
    for line in sys.stdin:
        # The parent kills us at the deadline; this CPU budget (SIGXCPU from the kernel) is the backstop for
        # when the parent itself was killed and a job that holds the GIL in C code would otherwise run on.
        used = resource.getrusage(resource.RUSAGE_SELF)
        _lower_limit(resource.RLIMIT_CPU, int(used.ru_utime + used.ru_stime + timeout_s) + CPU_SLACK_S)
        try:
            reply(_judge(*json.loads(line), parsed_golds))
        except MemoryError:
            reply([False, "out of memory"])
        except Exception as exc:  # noqa: BLE001 - any failure on one answer is that answer's error
            reply([False, f"{type(exc).__name__}: {str(exc)[:200]}"])


def _lower_limit(which: int, value: int) -> None:
    """Set a resource's soft limit to `value`, or to its hard limit where that is lower."""
    import resource

    _, hard = resource.getrlimit(which)
    resource.setrlimit(which, (value if hard == resource.RLIM_INFINITY else min(value, hard), hard))


# ------------------------------------------------------------------------------------ math: parent side

WORKER_COMMAND = "from roll.verifiers import _worker_main; _worker_main({timeout_s!r})"


class _Worker:
    """One worker process and the job it holds: (result index, prediction, gold) or None.

    A plain subprocess rather than multiprocessing: spawn/forkserver children re-import the caller's
    __main__, which breaks any script without an `if __name__ == "__main__"` guard, and fork is unsafe in a
    process that already runs torch threads.
    """

    def __init__(self, timeout_s: float):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # import roll as we do
        command = [sys.executable, "-c", WORKER_COMMAND.format(timeout_s=timeout_s)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                        text=True, encoding="ascii")
        self.ready = False
        self.job: tuple[int, str, str] | None = None
        self.since = time.perf_counter()  # when it was started, or when its current job was sent

    def fileno(self) -> int:
        """For `multiprocessing.connection.wait`, which polls anything with a fileno (select() would
        fail on descriptors above 1024, common in a process that holds a model and its data)."""
        return self.process.stdout.fileno()

    def send(self, job: tuple[int, str, str]) -> None:
        self.job, self.since = job, time.perf_counter()
        self.process.stdin.write(json.dumps(job[1:]) + "\n")  # ASCII JSON: escapes keep it one line
        self.process.stdin.flush()

    def receive(self):
        """The next message; only called when readable. One request at a time, so one line is waiting."""
        line = self.process.stdout.readline()
        if not line:
            raise EOFError
        return json.loads(line)

    def exit_code(self) -> int | None:
        try:
            return self.process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, kill: bool = False) -> None:
        try:
            self.process.stdin.close()  # end of input: an idle worker exits by itself
        except OSError:
            pass
        try:
            self.process.wait(timeout=0 if kill else 2.0)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


def _stop_workers(workers: list) -> None:
    for worker in workers:
        worker.stop()
    workers.clear()


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
        self.timeout_s, self.num_workers, self.max_answer_chars = timeout_s, workers, max_answer_chars
        self._workers: list[_Worker] = []  # started on first use, so building a verifier is free
        self._lock = threading.Lock()  # one batch at a time; callers on several threads queue here
        self._finalizer = weakref.finalize(self, _stop_workers, self._workers)

    def close(self) -> None:
        with self._lock:
            _stop_workers(self._workers)

    def verify_many(self, completions: list[str], answers: list[str]) -> list[Verdict]:
        """One verdict per completion, each within `timeout_s` of the moment its answer reached a worker."""
        self._check_lengths(completions, answers)
        verdicts: list[Verdict | None] = [None] * len(completions)
        extracted: dict[int, str] = {}
        jobs = collections.deque()
        for index, (completion, answer) in enumerate(zip(completions, answers)):
            start = time.perf_counter()
            found = extract_math_answer(completion)
            if found is None:
                verdicts[index] = Verdict(False, "", False, "", _ms_since(start))
            elif len(found) > self.max_answer_chars:
                error = f"answer too long ({len(found)} > {self.max_answer_chars} characters)"
                verdicts[index] = Verdict(False, found[:self.max_answer_chars], True, error, _ms_since(start))
            else:
                extracted[index] = found
                jobs.append((index, normalize_answer(found), str(answer)))
        if jobs:
            with self._lock:
                self._run(jobs, extracted, verdicts)
        return verdicts

    def _run(self, jobs: collections.deque, extracted: dict[int, str], verdicts: list) -> None:
        """Feed jobs to idle workers; collect answers; kill and replace any worker past its deadline."""
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self.timeout_s))
        while jobs or any(w.job is not None for w in self._workers):
            for slot, worker in enumerate(self._workers):
                if worker.ready and worker.job is None and jobs:
                    try:
                        worker.send(jobs[0])
                        jobs.popleft()
                    except OSError:  # it died while idle: a fresh worker takes the job next round
                        self._replace(slot)
            waiting = [w for w in self._workers if w.job is not None or not w.ready]
            wait_s = min(self._deadline(w) for w in waiting) - time.perf_counter()
            answered = multiprocessing.connection.wait(waiting, timeout=max(0.0, wait_s))
            for slot, worker in enumerate(self._workers):
                if worker in answered:
                    self._receive(slot, extracted, verdicts)
                elif worker in waiting and time.perf_counter() >= self._deadline(worker):
                    self._expire(slot, extracted, verdicts)

    def _deadline(self, worker: _Worker) -> float:
        return worker.since + (self.timeout_s if worker.ready else STARTUP_TIMEOUT_S)

    def _receive(self, slot: int, extracted: dict[int, str], verdicts: list) -> None:
        worker = self._workers[slot]
        try:
            message = worker.receive()
        except (EOFError, OSError):  # the worker died (killed by the OS, crashed in C code, ...)
            code = worker.exit_code()
            if not worker.ready:
                _stop_workers(self._workers)
                raise RollError(f"math verifier worker exited on start-up (exit code {code}); see its stderr")
            self._finish(worker, extracted, verdicts, False, f"worker died (exit code {code})")
            self._replace(slot)
            return
        if message == "ready":
            worker.ready = True
        else:
            self._finish(worker, extracted, verdicts, *message)

    def _expire(self, slot: int, extracted: dict[int, str], verdicts: list) -> None:
        worker = self._workers[slot]
        if not worker.ready:
            _stop_workers(self._workers)
            raise RollError(f"math verifier worker did not start within {STARTUP_TIMEOUT_S:g} s")
        self._finish(worker, extracted, verdicts, False, f"timeout after {self.timeout_s:g} s")
        self._replace(slot)

    def _finish(self, worker: _Worker, extracted: dict[int, str], verdicts: list, correct: bool, error: str):
        index = worker.job[0]
        verdicts[index] = Verdict(bool(correct), extracted[index], True, error, _ms_since(worker.since))
        worker.job = None

    def _replace(self, slot: int) -> None:
        """Kill the worker in `slot` and start a fresh one; its SymPy state may be arbitrarily bad."""
        self._workers[slot].stop(kill=True)
        self._workers[slot] = _Worker(self.timeout_s)


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
    """The verifier a task's answers need: exact integers for arith, math-verify for everything else."""
    return ARITH if task == ARITH else "math"
