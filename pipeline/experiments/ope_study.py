"""The off-policy evaluation experiment (EXPERIMENTS.md, issue 14): every checkpoint v of a run judged by
`roll ope` on stale data from v − 1, v − 4 and v − 8, against the truth measured on-policy.

Truth: v's own on-policy train reward (the mean reward of the rollouts v sampled) and its held-out pass@1
(the run's evaluations). Reported per data lag: coverage (share of checkpoints whose LS bound ≤ truth), the
mean gap truth − bound, the mean absolute error of SNIPS and IPS, and whether the checkpoint with the highest
bound is among the top 3 by held-out pass@1.

    python -m roll.pipeline.experiments.ope_study RUN --out docs/experiments/ope [--lags 1,4,8] [--delta 0.05]
    python -m roll.pipeline.experiments.ope_study RUN --held-out COPY --out …   # stale data no update trained on

With `--held-out COPY`, RUN is copied to COPY and every version's rollouts there are replaced by fresh ones
from the same checkpoint and sampler settings on train prompts no version of RUN sampled, then verified: the stale data is then not in-sample for any
checkpoint, and each version's own (equally fresh) rollouts give its on-policy truth.

The run needs every version's checkpoint (no `--keep-policies`) and an evaluation of every version
(`roll iterate --eval-every 1`). Weighing is resumable: ope files already made are reused.
"""
from __future__ import annotations

import argparse
import csv
import math
import random
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


def held_out_copy(run: Run, copy: Path) -> Run:
    """`run` copied to `copy` (checkpoints, evals; no ope files) with each version d's rollouts resampled from
    checkpoint d on train prompts no version of `run` sampled (disjoint across versions), then verified."""
    import shutil

    from roll.pipeline.prepare import prepare
    from roll.policy import load_policy, pick_device
    from roll.rollouts import prompt_tokens, sample_rollouts

    if copy.exists() and not (copy / "run.toml").is_file():
        raise SystemExit(f"{copy}: exists and is not a run; choose a new directory for the held-out copy")
    if not copy.exists():
        shutil.copytree(run.root, copy, ignore=shutil.ignore_patterns("ope", "rollouts", "verdicts", "scores", ".locks"))
    target = Run(copy)
    prompts = run.read_prompts()
    train_ids = [p for p, split in zip(prompts.column("prompt_id").to_pylist(), prompts.column("split").to_pylist())
                 if split == "train"]
    used = set(run.connect(tables={"rollouts"}).execute("SELECT DISTINCT prompt_id FROM rollouts").fetchnumpy()["prompt_id"])
    unused = [p for p in train_ids if p not in used]
    random.Random("held-out").shuffle(unused)  # each version its own prompts, none of them read by any update
    for version in run.versions("rollouts"):
        if target.files("rollouts", version):
            continue  # resumable: this version was resampled already
        first = run.read_version("rollouts", version).slice(0, 1).to_pylist()[0]
        count = len({r for r in run.read_version("rollouts", version).column("prompt_id").to_pylist()})
        group = run.read_version("rollouts", version).num_rows // count
        chosen = unused[version * count:(version + 1) * count]
        model, tokenizer = load_policy(target.policy_dir(version), pick_device("auto"))
        table = sample_rollouts(model, tokenizer, version, chosen, prompt_tokens(prompts, tokenizer, chosen),
                                group_size=group, max_new_tokens=first["max_new_tokens"], temperature=first["temperature"],
                                top_p=first["top_p"], seed=7, batch_size=256, backend="hf",
                                description=f"held-out rollouts of v{version}")
        target.commit_shard("rollouts", version, "part-00000-of-00001.parquet", table)
    prepare(target, target.versions("rollouts"), ref=False)
    return target


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
    parser.add_argument("--held-out", type=Path, default=None, help="copy the run here with held-out stale data")
    args = parser.parse_args()
    lags = tuple(int(x) for x in args.lags.split(","))
    run = held_out_copy(Run(args.run), args.held_out) if args.held_out else Run(args.run)
    rows = collect(run, lags, args.delta, args.rule)
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
