"""Theory check (DESIGN §2.1): a tabular softmax policy trained on each regression objective reaches the
Lambert target, not the Boltzmann one. Prints one markdown row per objective.

    python bench/theory_check.py [--beta 0.5] [--samples 4000] [--seed 0]
"""
from __future__ import annotations

import argparse

from roll.theory import tabular_check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cases = [("pmd-mean", 1.0), ("stable-pess", 1.0), ("lme", 1.0), ("oapl", args.beta / 2), ("oapl", args.beta * 2)]
    print(f"K = 5 outputs, {args.samples} samples from a fixed π_b, β = {args.beta}, seed {args.seed}\n")
    print("| baseline | β₁ | m | k | regime | TV(fit, Lambert) | TV(fit, Boltzmann) | group k (weights 1/N) |")
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    for objective, beta1 in cases:
        r = tabular_check(objective, beta=args.beta, beta1=beta1, samples=args.samples, seed=args.seed)
        print(f"| {objective} | {beta1 if objective == 'oapl' else '—'} | {r['m']:.4f} | {r['k']:.4f} | {r['regime']} | "
              f"{r['tv_to_lambert']:.1e} | {r['tv_to_boltzmann']:.4f} | {r['group_k']:.4f} |")


if __name__ == "__main__":
    main()
