"""Reward functions of your own: `roll verify --reward SPEC --reward-weight W` (both repeatable, paired in order).

A SPEC is

* `correct` — the built-in verifier's reward: 1 if the answer is correct else 0, minus `--format-penalty` when no
  answer was found (what `roll verify` gives with no `--reward`);
* `module:function` — a function in an importable module (the working directory is searched last, as
  TRL's `reward_funcs` take a dotted import path);
* `path/to/file.py:function` — a function in a Python file (as verl's `custom_reward_function.path`).

The function is called as `function(completion, answer, prompt)`: the completion's text, the ground truth, and
the prompt's row of the run's prompts table as a dict (`prompt_id`, `task`, `split`, `prompt`, `answer`,
`metadata` — a JSON string). It returns a number (a bool counts as 0 or 1), a dict with a "reward" entry, or an
object with a `.reward` attribute (a `roll.verifiers.Verdict`, say). The row's reward is the weighted sum of its
terms, Σ weight · value, and the terms are recorded in the verdict's `reward_terms` column as JSON:

    [{"reward": "correct", "weight": 1.0, "value": 1.0},
     {"reward": "fmt.py:format_reward", "weight": 0.25, "value": 0.0, "error": "timeout after 5 s"}]

A user's function runs in bounded worker processes (`roll/workers.py`, the math verifier's machinery): a deadline
per call (`--timeout`), a CPU budget and an address-space cap. A call that times out, raises, returns something
that is not a finite number, or kills its process is that term's error, with value 0, and named in the verdict's
`error` column; the worker is replaced and the stage goes on. A function that cannot be loaded (no such module
or file, no such function, not callable, its import raises) is one line naming the SPEC before any verdict is
written.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from roll.errors import RollError
from roll.workers import WorkerPool, serve, start_worker

CORRECT = "correct"
SPEC_FORMS = "write correct, module:function or path/to/file.py:function"
WORKER_COMMAND = "from roll.rewards import _worker_main; _worker_main({spec!r}, {source!r}, {function!r}, {timeout_s!r})"


@dataclass(frozen=True)
class RewardSpec:
    """One --reward: as written (what `reward_terms` records), and where its function lives."""

    spec: str
    source: str = ""  # a module name, or a .py file's absolute path; "" for the built-in `correct`
    function: str = ""

    @property
    def builtin(self) -> bool:
        return self.spec == CORRECT


def parse_reward(spec: str) -> RewardSpec:
    """A --reward SPEC checked for its form (the import itself happens in the workers); one line if bad."""
    if spec == CORRECT:
        return RewardSpec(spec)
    source, colon, function = spec.rpartition(":")
    if not spec.strip():
        raise RollError(f"--reward '{spec}' is empty: {SPEC_FORMS}")
    if not colon or not source or not function.isidentifier():
        raise RollError(f"--reward {spec}: {SPEC_FORMS}")
    if source.endswith(".py") or "/" in source:
        path = Path(source).expanduser()
        if not path.is_file():
            raise RollError(f"--reward {spec}: no file {path}")
        return RewardSpec(spec, str(path.resolve()), function)  # the workers may not share our working directory
    if not all(part.isidentifier() for part in source.split(".")):
        raise RollError(f"--reward {spec}: '{source}' is neither a module name nor a .py file; {SPEC_FORMS}")
    return RewardSpec(spec, source, function)


def parse_terms(specs: tuple[str, ...] | None, weights: tuple[float, ...] | None) -> list[tuple[RewardSpec, float]]:
    """(spec, weight) per term. No --reward is `correct` alone with weight 1 (the verify stage's reward as it
    always was); no --reward-weight weighs each term 1. One line for a count mismatch, a repeated SPEC or a
    weight that is not a finite number."""
    if not specs:
        if weights:
            raise RollError(f"--reward-weight given {len(weights)} time(s) but no --reward: "
                            "each weight goes with the --reward in the same place")
        return [(RewardSpec(CORRECT), 1.0)]
    weights = weights or (1.0,) * len(specs)
    if len(weights) != len(specs):
        raise RollError(f"--reward given {len(specs)} time(s) but --reward-weight {len(weights)} time(s): give one "
                        "weight per reward, in the same order, or none (each weighs 1)")
    for weight in weights:
        if not math.isfinite(weight):
            raise RollError(f"--reward-weight {weight}: must be a finite number")
    repeated = next((s for i, s in enumerate(specs) if s in specs[:i]), None)
    if repeated is not None:
        raise RollError(f"--reward {repeated} is given twice: give it once with the sum of its weights")
    return [(parse_reward(spec), float(weight)) for spec, weight in zip(specs, weights)]


@dataclass(frozen=True)
class Scored:
    """One row's reward: the weighted sum, its terms as JSON, and the terms' errors ("" when none)."""

    reward: float
    terms: str
    errors: str


class CompositeReward:
    """Σ weight · value over the terms of `parse_terms`; the users' functions in bounded worker processes (one
    pool of `workers` per function). Use as a context manager so the workers stop."""

    def __init__(self, terms: list[tuple[RewardSpec, float]], timeout_s: float, workers: int,
                 format_penalty: float = 0.0):
        self.terms, self.format_penalty = terms, format_penalty
        self.pools = {spec.spec: WorkerPool(WORKER_COMMAND.format(spec=spec.spec, source=spec.source,
                                                                  function=spec.function, timeout_s=timeout_s),
                                            timeout_s, workers, f"--reward {spec.spec}")
                      for spec, _ in terms if not spec.builtin}

    def __enter__(self) -> "CompositeReward":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()

    def start(self) -> None:
        """Load every user function in its workers now: one that cannot be loaded is one line (RollError)."""
        try:
            for pool in self.pools.values():
                pool.start()
        except RollError:
            self.close()
            raise

    def score_many(self, completions: list[str], answers: list[str], prompts: list[dict], verdicts: list) -> list[Scored]:
        """Each row's reward from its completion, ground truth, prompt row and the built-in verifier's verdict."""
        values = {}  # spec -> per row (value, error)
        for spec, _ in self.terms:
            if spec.builtin:
                values[spec.spec] = [((1.0 if v.correct else 0.0) - (0.0 if v.format_ok else self.format_penalty), "")
                                     for v in verdicts]
            else:
                outcomes = self.pools[spec.spec].run(
                    [(i, [c, a, p]) for i, (c, a, p) in enumerate(zip(completions, answers, prompts))])
                values[spec.spec] = [_term(outcomes[i]) for i in range(len(completions))]
        return [self._combine([(spec, weight, *values[spec.spec][row]) for spec, weight in self.terms])
                for row in range(len(completions))]

    @staticmethod
    def _combine(row_terms: list) -> Scored:
        terms, errors, weighted = [], [], []
        for spec, weight, value, error in row_terms:
            if not error and not math.isfinite(weight * value):
                value, error = 0.0, f"weight {weight:g} times value {value:g} is not a finite number"
            terms.append({"reward": spec.spec, "weight": weight, "value": value, **({"error": error} if error else {})})
            errors += [f"{spec.spec}: {error}"] if error else []
            weighted.append(weight * value)
        total = math.fsum(weighted)
        if not math.isfinite(total):
            total, errors = 0.0, errors + ["the weighted sum is not a finite number; reward 0"]
        return Scored(total, json.dumps(terms), "; ".join(errors))


def _term(outcome) -> tuple[float, str]:
    """(value, error) of one call: 0 and the error for a timeout or a dead worker, else the worker's reply."""
    if outcome.reply is None:
        return 0.0, outcome.error
    value, error = outcome.reply
    return (0.0, error) if error else (float(value), "")


# ------------------------------------------------------------------------------------------- worker side


def _load(spec: str, source: str, name: str):
    """The function a SPEC names, imported in this worker; RollError naming the SPEC if it cannot be."""
    import importlib
    import importlib.util
    import os
    import sys

    try:
        if source.endswith(".py"):
            sys.path.append(os.path.dirname(source))  # so the file can import its neighbours
            module_name = f"roll_reward_{Path(source).stem}"
            loader = importlib.util.spec_from_file_location(module_name, source)
            module = importlib.util.module_from_spec(loader)
            sys.modules[module_name] = module  # dataclasses and pickle look their module up here
            loader.loader.exec_module(module)
        else:
            sys.path.append(os.getcwd())  # a module beside the user, after everything installed
            module = importlib.import_module(source)
    except BaseException as exc:  # noqa: BLE001 - whatever the import does (SyntaxError, SystemExit, ...) is one line
        raise RollError(f"--reward {spec}: cannot import {source}: {type(exc).__name__}: {str(exc)[:200]}") from None
    function = getattr(module, name, None)
    if function is None:
        raise RollError(f"--reward {spec}: {source} has no function '{name}'")
    if not callable(function):
        raise RollError(f"--reward {spec}: '{name}' in {source} is a {type(function).__name__}, not a function")
    return function


def reward_value(value) -> list:
    """[value, ""] for what a reward function returned, or [None, error] when it is not a finite number."""
    if isinstance(value, dict):
        if "reward" not in value:
            return [None, f"returned a dict without a 'reward' entry (keys: {', '.join(map(str, list(value)[:5]))})"]
        value = value["reward"]
    elif hasattr(value, "reward") and not isinstance(value, (int, float)):
        value = value.reward
    if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
        return [None, f"returned {type(value).__name__}, not a number"]
    try:
        number = float(value)
    except (OverflowError, ValueError, TypeError) as exc:
        return [None, f"returned {type(value).__name__} that is not a float: {exc}"]
    if not math.isfinite(number):
        return [None, f"returned {number}, not a finite number"]
    return [number, ""]


def _worker_main(spec: str, source: str, name: str, timeout_s: float) -> None:
    """Worker process (roll/workers.py): reads [completion, answer, prompt row], writes [value, ""] or
    [None, "error"]. It loads the function before saying "ready", or sends why it cannot and exits."""
    channel = start_worker()
    try:
        function = _load(spec, source, name)
    except RollError as exc:
        channel.reply(str(exc))
        return

    def call(job: list) -> list:
        try:
            value, error = reward_value(function(*job))
        except SystemExit as exc:  # sys.exit() in a reward function is its error, not the worker's end
            value, error = None, f"SystemExit: {exc}"
        return [value, error[:300]]

    serve(channel, call, timeout_s, on_error=lambda error: [None, error])
