"""The off-policy evaluation experiment (EXPERIMENTS.md, issue 14): every checkpoint v of a run judged by
`roll ope` on stale data from v − 1, v − 4 and v − 8, against the truth measured on-policy.

Truth: v's own on-policy train reward (the mean reward of the rollouts v sampled) and its held-out pass@1
(the run's evaluations). Reported per data lag: coverage (share of checkpoints whose LS bound ≤ truth), the
mean gap truth − bound, the mean absolute error of SNIPS and IPS, and whether the checkpoint with the highest
bound is among the top 3 by held-out pass@1.

    python -m roll.pipeline.ope_study RUN --out docs/experiments/ope [--lags 1,4,8] [--delta 0.05]

The run needs every version's checkpoint (no `--keep-policies`) and an evaluation of every version
(`roll iterate --eval-every 1`). Weighing is resumable: ope files already made are reused.
"""
from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

from roll.store import Run


def collect(run: Run, lags: tuple[int, ...], delta: float, rule: str) -> list[dict]:
    from roll.stages.ope import OpeConfig, run as run_ope

    on_policy = dict(run.connect().execute("SELECT policy_version, avg(reward) FROM verdicts GROUP BY 1").fetchall())
    held_out = dict(run.connect().execute("SELECT policy_version, avg(correct::DOUBLE) FROM evals GROUP BY 1").fetchall())
    rows = []
    for version in run.checkpoint_versions():
        for lag in lags:
            if version - lag < 0 or version - lag not in on_policy:
                continue
            summary = run_ope(OpeConfig(run=run.root, version=version, data_versions=(version - lag, version - lag),
                                        delta=delta, lambda_rule=rule))
            rows.append({"version": version, "lag": lag, "data_version": version - lag,
                         "ls_bound": summary["ls_bound"], "ls_estimate": summary["ls_estimate"],
                         "snips": summary["snips"], "ips": summary["ips"], "ess_share": summary["ess_share"],
                         "heavy_share": summary["heavy_share"], "lambda": summary["lambda"],
                         "on_policy_reward": on_policy.get(version, math.nan),
                         "held_out_pass1": held_out.get(version, math.nan)})
    return rows


def tabulate(rows: list[dict], lags: tuple[int, ...]) -> list[str]:
    lines = ["| data from | checkpoints | coverage vs on-policy reward | coverage vs held-out | mean gap (reward − bound) | "
             "SNIPS abs. error | IPS abs. error | mean ESS share | best-bound pick | its held-out rank |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for lag in lags:
        cases = [r for r in rows if r["lag"] == lag and not math.isnan(r["on_policy_reward"])]
        if not cases:
            continue
        n = len(cases)
        cover = sum(r["ls_bound"] <= r["on_policy_reward"] for r in cases) / n
        cover_held = sum(r["ls_bound"] <= r["held_out_pass1"] for r in cases) / n
        gap = sum(r["on_policy_reward"] - r["ls_bound"] for r in cases) / n
        snips = sum(abs(r["snips"] - r["on_policy_reward"]) for r in cases) / n
        ips = sum(abs(r["ips"] - r["on_policy_reward"]) for r in cases) / n
        ess = sum(r["ess_share"] for r in cases) / n
        pick = max(cases, key=lambda r: (r["ls_bound"], -r["version"]))
        ranked = sorted((r["held_out_pass1"] for r in cases), reverse=True)
        rank = 1 + sum(h > pick["held_out_pass1"] for h in ranked)
        lines.append(f"| v − {lag} | {n} | {100 * cover:.0f}% | {100 * cover_held:.0f}% | {gap:+.3f} | {snips:.3f} | "
                     f"{ips:.3f} | {ess:.2f} | v{pick['version']} | {rank} of {n} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs/experiments/ope"))
    parser.add_argument("--lags", default="1,4,8")
    parser.add_argument("--delta", type=float, default=0.05)
    parser.add_argument("--lambda", dest="rule", default="auto")
    args = parser.parse_args()
    lags = tuple(int(x) for x in args.lags.split(","))
    rows = collect(Run(args.run), lags, args.delta, args.rule)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "ope.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = tabulate(rows, lags)
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    plot(rows, lags, args.out / "ope.png")
    print("\n".join(lines))


def plot(rows: list[dict], lags: tuple[int, ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from roll.pipeline.report import plot_ope

    data = {"run": {"ope": [{"version": r["version"], "lag": r["lag"], "ls_bound": r["ls_bound"], "snips": r["snips"],
                             "on_policy": r["on_policy_reward"], "held_out": r["held_out_pass1"]}
                            for r in rows if r["lag"] in lags]}}
    plot_ope(plt, data, path)


if __name__ == "__main__":
    main()
