"""report: PNG plots and a markdown summary over one or several runs, every number from SQL on their tables.

    pass1.png        held-out pass@1 against optimiser steps and against completions generated
    training.png     token entropy, KL(π_b‖π_θ), clipped or masked share, ESS, the signed log-ratio Δ and the
                     second moment of the token log-ratios per optimiser step
    regimes.png      share of groups in each Lambert regime, and median k, by lag
    ope.png          per version: the LS lower bound and SNIPS from stale data (roll ope) against the version's
                     own on-policy train reward and its held-out pass@1 (only for runs with ope summaries)
    summary.md       one row per run: objective, lag, final pass@1, whether it collapsed, entropy at the end,
                     regime shares

With --to tensorboard (wandb, trackio) it draws no plots: it rebuilds each run's metrics sinks from its tables
instead (roll/sinks.py), so a run made without --log-to can still be looked at in TensorBoard.

Runs are labelled by their directory name; several runs share each figure so they compare directly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from roll.errors import RollError
from roll.options import option
from roll.store import Run, rows

QUERIES = {
    # the optimiser steps behind version v: every step of the updates that produced versions 1…v
    # pass1_se: one evaluation's standard error, over prompts of the per-prompt pass rate
    "pass1": """WITH per_prompt AS (SELECT policy_version, prompt_id, avg(correct::DOUBLE) AS pass1
                                    FROM evals GROUP BY 1, 2)
                SELECT policy_version, avg(pass1) AS pass1, stddev_samp(pass1) / sqrt(count(*)) AS pass1_se,
                       (SELECT count(*) FROM steps s WHERE s.policy_version <= e.policy_version) AS optimizer_steps
                FROM per_prompt e GROUP BY 1 ORDER BY 1""",
    "samples": """SELECT policy_version, count(*) AS samples FROM rollouts GROUP BY 1 ORDER BY 1""",
    # every column: runs made before a diagnostic existed lack it (their panel is left empty)
    "training": """SELECT * FROM steps ORDER BY global_step""",
    "regimes": """SELECT lag, regime, count(*) AS groups FROM groups GROUP BY 1, 2 ORDER BY 1, 2""",
    "median_k": """SELECT lag, median(k) AS median_k FROM groups WHERE NOT isnan(k) GROUP BY 1 ORDER BY 1""",
    # one summary per (target, data version): roll ope's default settings (δ 0.05, λ auto) where they were run,
    # else the smallest δ; on-policy reward: the mean over v's own rollouts
    "ope": """SELECT o.target_version AS version, o.target_version - o.data_hi AS lag, o.ls_bound, o.snips,
                     (SELECT avg(reward) FROM verdicts v WHERE v.policy_version = o.target_version) AS on_policy,
                     (SELECT avg(correct::DOUBLE) FROM evals e WHERE e.policy_version = o.target_version) AS held_out
              FROM ope_summary o WHERE o.data_lo = o.data_hi
              QUALIFY row_number() OVER (PARTITION BY o.target_version, o.data_lo
                                         ORDER BY (o.delta = 0.05 AND o.lambda_rule = 'auto') DESC, o.delta,
                                                  o.lambda_rule) = 1
              ORDER BY 2, 1""",
    "meta": """SELECT any_value(objective) AS objective, max(lag) AS max_lag, count(DISTINCT policy_version) AS updates
               FROM groups""",
}
REGIMES = ("pessimistic", "boundary", "optimistic", "optimistic-no-solution", "n/a")


@dataclass(frozen=True)
class ReportConfig:
    runs: tuple[Path, ...] = option((), "Run directory to include (repeatable). [default: $ROLL_RUN, else ./runs/default]",
                                    flag="--run", repeatable=True, show_default=False)
    out: Path = option(Path("report"), "Directory for the PNGs and summary.md.")
    to: tuple[str, ...] | None = option(None, "Instead of plots, rebuild these metrics sinks of each run from its tables "
                                              "(tensorboard, wandb, trackio; comma-separated), replacing "
                                              "RUN/logs/<sink>/. [default: none]", show_default=False)


def collapsed(evaluations: list[dict]) -> bool:
    """A run collapsed when its final held-out pass@1 is below its first by more than two standard errors of
    one evaluation (the first's: pass1_se over prompts). Needs two evaluations."""
    if len(evaluations) < 2:
        return False
    return evaluations[-1]["pass1"] < evaluations[0]["pass1"] - 2 * evaluations[0]["pass1_se"]


def collect(run: Run) -> dict:
    data = {name: rows(run, sql) for name, sql in QUERIES.items()}
    cumulative, total = {}, 0
    for row in data["samples"]:
        total += row["samples"]
        cumulative[row["policy_version"]] = total
    data["cumulative_samples"] = cumulative
    return data


def run(config: ReportConfig) -> dict:
    runs = [Run(path) for path in config.runs]
    for r in runs:
        if not r.exists():
            raise RollError(f"{r.root}: no run here")
    if config.to:
        from roll.sinks import check_sinks, replay

        check_sinks(config.to, "--to")  # every run's sinks or none
        return {"sinks": [replay(r, config.to) for r in runs]}

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {r.root.name if len({x.root.name for x in runs}) == len(runs) else str(r.root): collect(r) for r in runs}
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_pass1(plt, data, out / "pass1.png")
    plot_training(plt, data, out / "training.png")
    plot_regimes(plt, data, out / "regimes.png")
    if any(d["ope"] for d in data.values()):
        plot_ope(plt, data, out / "ope.png")
    summary = write_summary(data, out)
    return {"out": str(out), "runs": summary, "files": sorted(p.name for p in out.iterdir())}


def plot_pass1(plt, data: dict, path: Path) -> None:
    """Held-out pass@1 against optimiser steps and against completions generated, not versions: a version of
    S steps (sync interval S) and S versions of one step then sit at the same place on the axis."""
    fig, (by_steps, by_samples) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, d in data.items():
        versions = [row["policy_version"] for row in d["pass1"]]
        pass1 = [100 * row["pass1"] for row in d["pass1"]]
        by_steps.plot([row["optimizer_steps"] for row in d["pass1"]], pass1, marker="o", label=label)
        # samples generated before version v was produced: rollouts of versions < v
        seen = [d["cumulative_samples"].get(v - 1, 0) for v in versions]
        by_samples.plot(seen, pass1, marker="o", label=label)
    by_steps.set(xlabel="optimiser steps", ylabel="held-out pass@1 (%)", title="pass@1 by optimiser steps")
    by_samples.set(xlabel="completions generated", ylabel="held-out pass@1 (%)", title="pass@1 by samples generated")
    for ax in (by_steps, by_samples):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training(plt, data: dict, path: Path) -> None:
    """Entropy, KL(π_b‖π_θ), clipped or masked share, ESS, the signed log-ratio Δ and the second moment of the
    token log-ratios per optimiser step."""
    fig, axes = plt.subplots(2, 3, figsize=(17, 8))
    panels = (("entropy", "token entropy of π_θ (nats)"), ("kl_behaviour", "KL(π_b‖π_θ) per token (k3, nats)"),
              ("clip_fraction", "clipped or masked share of tokens"), ("ess", "ESS of sequence weights e^Δ (share)"),
              ("log_ratio_mean", "mean signed Δ = log π_θ − log π_b (nats)"),
              ("log_ratio_sq_mean", "token-mean (log ρ)² (M2PO's second moment)"))
    for ax, (key, ylabel) in zip(axes.flat, panels):
        for label, d in data.items():
            ax.plot([row["global_step"] for row in d["training"]],
                    [row.get(key, math.nan) for row in d["training"]], marker=".", label=label)
        ax.set(xlabel="optimiser step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_regimes(plt, data: dict, path: Path) -> None:
    """Share of groups in each Lambert regime by lag (bars side by side per run), and median k by lag."""
    fig, (shares, median_k) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(len(data), 1)
    labelled: set[str] = set()
    all_lags: set[int] = set()
    for i, (label, d) in enumerate(data.items()):
        lags = sorted({row["lag"] for row in d["regimes"]})
        all_lags.update(lags)
        totals = {lag: sum(row["groups"] for row in d["regimes"] if row["lag"] == lag) for lag in lags}
        bottom = [0.0] * len(lags)
        for j, regime in enumerate(REGIMES):
            share = [100 * sum(row["groups"] for row in d["regimes"] if row["lag"] == lag and row["regime"] == regime)
                     / totals[lag] for lag in lags]
            if any(share):
                shares.bar([lag - 0.4 + (i + 0.5) * width for lag in lags], share, width, bottom=bottom,
                           color=f"C{j}", label=None if regime in labelled else regime, edgecolor="black", linewidth=0.3)
                labelled.add(regime)
                bottom = [b + s for b, s in zip(bottom, share)]
        median_k.plot([row["lag"] for row in d["median_k"]], [row["median_k"] for row in d["median_k"]],
                      marker="o", label=label)
    shares.set(xlabel="lag (versions behind; bars side by side per run)", ylabel="groups (%)", title="Lambert regime by lag")
    shares.set_xticks(sorted(all_lags))
    shares.legend(fontsize=8)
    median_k.set(xlabel="lag (versions behind)", ylabel="median k", title="median Lambert k by lag")
    median_k.set_xticks(sorted(all_lags))
    median_k.grid(alpha=0.3)
    median_k.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_summary(data: dict, out: Path) -> dict:
    """summary.md: one row per run (objective, lag, pass@1 first and final, entropy, regime shares), the figures."""
    lines = ["# roll report", "", "| run | objective | max lag | updates | first pass@1 | final pass@1 | collapsed | "
             "final entropy | pessimistic | boundary | optimistic |", "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    summary = {}
    for label, d in data.items():
        meta = d["meta"][0] if d["meta"] else {}
        total = sum(row["groups"] for row in d["regimes"]) or 1
        share = {regime: sum(row["groups"] for row in d["regimes"] if row["regime"].startswith(regime)) / total
                 for regime in ("pessimistic", "boundary", "optimistic")}
        first = d["pass1"][0]["pass1"] if d["pass1"] else math.nan
        final = d["pass1"][-1]["pass1"] if d["pass1"] else math.nan
        entropy = d["training"][-1]["entropy"] if d["training"] else math.nan
        fell = collapsed(d["pass1"])
        summary[label] = {"objective": meta.get("objective"), "final_pass1": final, "collapsed": fell,
                          "final_entropy": entropy, **share}
        lines.append(f"| {label} | {meta.get('objective')} | {meta.get('max_lag')} | {meta.get('updates')} | "
                     f"{100 * first:.1f}% | {100 * final:.1f}% | {'yes' if fell else 'no'} | {entropy:.3f} | "
                     f"{100 * share['pessimistic']:.0f}% | "
                     f"{100 * share['boundary']:.0f}% | {100 * share['optimistic']:.0f}% |")
    lines += ["", "![pass@1](pass1.png)", "", "![training](training.png)", "", "![regimes](regimes.png)", ""]
    if (out / "ope.png").exists():
        lines += ["![ope](ope.png)", ""]
    (out / "summary.md").write_text("\n".join(lines))
    return summary


def plot_ope(plt, data: dict, path: Path) -> None:
    """One panel per data lag: the LS bound and SNIPS of each version from data that many versions old,
    beside the truth (its on-policy train reward, its held-out pass@1)."""
    lags = sorted({row["lag"] for d in data.values() for row in d["ope"]})
    fig, axes = plt.subplots(1, len(lags), figsize=(5.5 * len(lags), 4.2), squeeze=False)
    for ax, lag in zip(axes[0], lags):
        for i, (label, d) in enumerate(data.items()):
            rows = [row for row in d["ope"] if row["lag"] == lag]
            versions = [row["version"] for row in rows]
            prefix = f"{label}: " if len(data) > 1 else ""
            ax.plot(versions, [row["ls_bound"] for row in rows], marker="v", color=f"C{i}", label=f"{prefix}LS lower bound")
            ax.plot(versions, [row["snips"] for row in rows], marker="o", ls="--", color=f"C{i}", label=f"{prefix}SNIPS")
            ax.plot(versions, [row["on_policy"] for row in rows], marker="s", ls=":", color="black", alpha=0.7,
                    label=f"{prefix}on-policy train reward")
            held_out = [(row["version"], row["held_out"]) for row in rows if row["held_out"] is not None]
            if held_out:
                ax.plot(*zip(*held_out), marker="x", ls="-.", color="grey", label=f"{prefix}held-out pass@1")
        ax.set(xlabel="version v", ylabel="value", title=f"v judged on data from v − {lag}", ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
