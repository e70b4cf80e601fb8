"""Verifier accuracy on every bundled problem: its own gold answer must pass, a nearby wrong one must fail.

For each problem of each bundled dataset the `math` verifier sees two completions: the dataset's gold answer
in a box (`... The answer is \\boxed{GOLD}.`), which must be judged correct, and a perturbed answer (an
integer gold plus one; else the first integer inside the LaTeX plus one; else a changed term), which must be
judged wrong. Prints one markdown row per dataset and then every failing example.

    python bench/verifier_accuracy.py [--datasets gsm8k,math500] [--timeout 5] [--workers 2]
"""
from __future__ import annotations

import argparse
import re
import time

from roll.datasets import DATASETS, dataset_records
from roll.verifiers import make_verifier

COMPLETION = "Let me think step by step.\nAfter working it out, the answer is \\boxed{{{answer}}}."
FIRST_INTEGER = re.compile(r"\d+")
TEXT_LETTER = re.compile(r"\\(?:text|mbox|textbf)\{\(?([A-Za-z])")


def perturb(gold: str) -> str:
    """A nearby wrong answer: the gold plus one, with its first integer bumped, or with a term changed."""
    gold = gold.strip()
    if re.fullmatch(r"-?\d+", gold):
        return str(int(gold) + 1)
    number = FIRST_INTEGER.search(gold)
    if number:  # \frac{3}{56} -> \frac{4}{56}; zfill keeps .0000672 -> .0000673 a decimal of the same shape
        digits = number.group()
        return gold[:number.start()] + str(int(digits) + 1).zfill(len(digits)) + gold[number.end():]
    letter = TEXT_LETTER.search(gold)
    if letter:  # \text{(C)} -> \text{(D)}, \text{Evelyn} -> \text{Fvelyn}
        old = letter.group(1)
        new = "a" if old == "z" else "A" if old == "Z" else chr(ord(old) + 1)
        return gold[:letter.start(1)] + new + gold[letter.end(1):]
    return f"{gold} + 1"  # p - q -> p - q + 1, \pi -> \pi + 1


def evaluate(verifier, name: str) -> tuple[dict, list[str]]:
    """One table row for a dataset, and a line for each problem the verifier got wrong."""
    records = dataset_records(name)
    golds = [str(record["answer"]) for _, record in records]
    perturbed = [perturb(gold) for gold in golds]
    start = time.perf_counter()
    on_gold = verifier.verify_many([COMPLETION.format(answer=g) for g in golds], golds)
    on_perturbed = verifier.verify_many([COMPLETION.format(answer=p) for p in perturbed], golds)
    seconds = time.perf_counter() - start
    failures = []
    for (_, record), gold, wrong, right_verdict, wrong_verdict in zip(records, golds, perturbed, on_gold, on_perturbed):
        if not right_verdict.correct:
            failures.append(f"{name} {record['id']}: gold {gold!r} judged wrong {right_verdict.error!r}")
        if wrong_verdict.correct:
            failures.append(f"{name} {record['id']}: perturbed {wrong!r} of gold {gold!r} judged correct")
    verdicts = on_gold + on_perturbed
    row = {
        "dataset": name, "problems": len(records),
        "gold_correct": 100.0 * sum(v.correct for v in on_gold) / len(records),
        "perturbed_wrong": 100.0 * sum(not v.correct for v in on_perturbed) / len(records),
        "errors": sum(bool(v.error) for v in verdicts),
        "timeouts": sum(v.error.startswith("timeout") for v in verdicts),
        "seconds": seconds,
    }
    return row, failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated bundled dataset names")
    parser.add_argument("--timeout", type=float, default=5.0, help="per-answer time bound, seconds")
    parser.add_argument("--workers", type=int, default=2, help="verifier worker processes")
    args = parser.parse_args()

    rows, failures = [], []
    with make_verifier("math", timeout_s=args.timeout, workers=args.workers) as verifier:
        for name in args.datasets.split(","):
            row, failed = evaluate(verifier, name)
            rows.append(row)
            failures += failed
        version = verifier.version

    print(f"verifier: math ({version}), timeout {args.timeout:g} s, {args.workers} workers\n")
    print("| dataset | problems | gold judged correct | perturbed judged wrong | errors / timeouts | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['dataset']} | {r['problems']} | {r['gold_correct']:.2f}% | {r['perturbed_wrong']:.2f}% "
              f"| {r['errors']} / {r['timeouts']} | {r['seconds']:.1f} |")
    print(f"\n{len(failures)} failing examples" + (":" if failures else ""))
    for line in failures:
        print(f"- {line}")


if __name__ == "__main__":
    main()
