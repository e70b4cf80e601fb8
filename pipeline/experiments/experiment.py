"""The tables and plots of EXPERIMENTS.md, computed from the runs of a staleness grid (pipeline/experiments/grid.py).

    python -m roll.pipeline.experiments.experiment runs/grid --out docs/experiments

Every number comes from SQL over each run's own tables; nothing names a version: a run's start, middle and
end are its first evaluation, the one nearest half its optimiser steps, and its last. Writes into --out:

    evals.csv        per run and evaluated version: optimiser steps, completions generated, pass@1, pass@k
    steps.csv        every optimiser step of every run (the steps table, with the run's cell)
    groups.parquet   every group of every run (the groups table, with the run's cell)
    summary.md       mean ± std over seeds per cell, paired differences with 95 % intervals, diagnostics
    pass1.png        held-out pass@1 against optimiser steps and against completions, ± std over seeds
    diagnostics.png  token entropy, KL(π_b‖π_θ) and the signed log-ratio Δ per optimiser step
    regimes.png      share of groups per Lambert regime, and the mean Δ of groups, per cell
"""
from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

from roll.store import Run, relation_arrow

CELL = re.compile(r"^(?P<objective>[a-z0-9-]+?)-(?P<staleness>(lag|sync|offline)\d+(-fresh)?)-seed(?P<seed>\d+)$")
# two-sided 95 % Student t quantiles by degrees of freedom (seeds − 1)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
OBJECTIVE_ORDER = ("ppo", "pg", "oapl", "pmd-mean", "stable-pess")
STALENESS_ORDER = ("lag0", "lag4", "lag8", "sync8", "lag8-fresh")
LINESTYLES = {"lag0": "-", "lag4": (0, (1, 1)), "lag8": "--", "sync8": "-.", "lag8-fresh": ":"}

EVALS = """
    WITH steps_per_version AS (SELECT policy_version, count(*) AS n FROM steps GROUP BY 1),
         rollouts_per_version AS (SELECT policy_version, count(*) AS n FROM rollouts GROUP BY 1),
         per_prompt AS (SELECT policy_version, prompt_id, avg(correct::DOUBLE) AS pass1,
                               max(correct::INT)::DOUBLE AS pass_k, count(*) AS k
                        FROM evals GROUP BY 1, 2)
    SELECT p.policy_version,
           (SELECT coalesce(sum(n), 0) FROM steps_per_version s WHERE s.policy_version <= p.policy_version) AS optimizer_steps,
           (SELECT coalesce(sum(n), 0) FROM rollouts_per_version r WHERE r.policy_version < p.policy_version) AS completions,
           avg(pass1) AS pass1, avg(pass_k) AS pass_k, max(k) AS k, count(*) AS prompts,
           stddev_samp(pass1) / sqrt(count(*)) AS pass1_se  -- one evaluation's standard error over prompts
    FROM per_prompt p GROUP BY 1 ORDER BY 1"""


def mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return mean, std


def fmt(mean_and_std: tuple[float, float]) -> str:
    """"mean ± std", or the mean alone where one seed ran."""
    mean, std = mean_and_std
    return f"{mean:.1f}" if math.isnan(std) else f"{mean:.1f} ± {std:.1f}"


def interval(values: list[float]) -> str:
    """mean [95 % t-interval] of paired differences, in points."""
    mean, std = mean_std(values)
    if len(values) < 2:
        return f"{mean:+.1f} (one seed)"
    half = T95[len(values) - 1] * std / math.sqrt(len(values))
    return f"{mean:+.1f} [{mean - half:+.1f}, {mean + half:+.1f}]"


def collect(grid: Path):
    import pyarrow as pa

    runs, evals, steps, groups = [], [], [], []
    for path in sorted(grid.iterdir()):
        match = CELL.match(path.name)
        if not match or not (path / "iterate.json").is_file():  # only finished cells
            continue
        cell = {"cell": path.name, "objective": match["objective"], "staleness": match["staleness"],
                "seed": int(match["seed"])}
        con = Run(path).connect(tables={"evals", "steps", "groups", "rollouts"})
        rows = relation_arrow(con.sql(EVALS)).to_pylist()
        evals += [{**cell, **row} for row in rows]
        # the steps table's own objective column names the loss (stable-pess for stable-pess-parent, oapl for
        # oapl-shift); the tables name the variant, as evals and groups do
        steps += [{**cell, **row, "objective": cell["objective"]}
                  for row in relation_arrow(con.sql("SELECT * FROM steps ORDER BY global_step")).to_pylist()]
        group_table = relation_arrow(con.sql("SELECT * FROM groups ORDER BY policy_version, data_version, prompt_id"))
        for name in ("cell", "objective", "staleness"):
            group_table = group_table.append_column(name, pa.array([cell[name]] * group_table.num_rows))
        groups.append(group_table.append_column("seed", pa.array([cell["seed"]] * group_table.num_rows, pa.int64())))
        runs.append(cell)
    return runs, evals, steps, pa.concat_tables(groups) if groups else None


def at(rows: list[dict], which: str) -> dict:
    """A run's first, middle (nearest half its optimiser steps) or last evaluation."""
    if which == "start":
        return rows[0]
    if which == "end":
        return rows[-1]
    half = rows[-1]["optimizer_steps"] / 2
    return min(rows, key=lambda r: (abs(r["optimizer_steps"] - half), r["optimizer_steps"]))


def summarise(runs, evals, steps, groups) -> str:
    import pyarrow.compute as pc

    by_run = {}
    for row in evals:
        by_run.setdefault(row["cell"], []).append(row)
    cells: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        cells.setdefault((run["objective"], run["staleness"]), []).append(run)
    order = sorted(cells, key=lambda c: (STALENESS_ORDER.index(c[1]) if c[1] in STALENESS_ORDER else 99,
                                          OBJECTIVE_ORDER.index(c[0]) if c[0] in OBJECTIVE_ORDER else 99))
    lines = ["| objective | staleness | seeds | pass@1 start | middle (steps) | end | pass@4 end | entropy end | "
             "KL(π_b‖π_θ) mean | Δ mean | clip frac | pessimistic | boundary | optimistic |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    final = {}
    for key in order:
        members = sorted(cells[key], key=lambda r: r["seed"])
        names = {r["cell"] for r in members}
        seeds = ",".join(str(r["seed"]) for r in members)
        points = {w: mean_std([100 * at(by_run[r["cell"]], w)["pass1"] for r in members]) for w in ("start", "middle", "end")}
        mid_steps = sorted({at(by_run[r["cell"]], "middle")["optimizer_steps"] for r in members})
        pass_k = mean_std([100 * at(by_run[r["cell"]], "end")["pass_k"] for r in members])
        final[key] = {r["seed"]: 100 * at(by_run[r["cell"]], "end")["pass1"] for r in members}
        mine = [s for s in steps if s["cell"] in names]
        last_version = {r["cell"]: max(s["policy_version"] for s in mine if s["cell"] == r["cell"]) for r in members}
        entropy_end = mean_std([sum(s["entropy"] for s in mine if s["cell"] == c and s["policy_version"] == v) /
                                sum(1 for s in mine if s["cell"] == c and s["policy_version"] == v)
                                for c, v in last_version.items()])[0]
        kl = sum(s["kl_behaviour"] for s in mine) / len(mine)
        delta = sum(s["log_ratio_mean"] for s in mine) / len(mine)
        clip = sum(s["clip_fraction"] for s in mine) / len(mine)
        mask = pc.is_in(groups.column("cell"), value_set=__import__("pyarrow").array(sorted(names)))
        regimes = groups.filter(mask).column("regime").to_pylist()
        share = {name: sum(1 for r in regimes if r.startswith(name)) / len(regimes) for name in ("pessimistic", "boundary", "optimistic")}
        shares = ["n/a"] * 3 if all(r == "n/a" for r in regimes) else [f"{100 * share[n]:.0f}%" for n in share]
        lines.append(f"| {key[0]} | {key[1]} | {seeds} | {fmt(points['start'])} | {fmt(points['middle'])} "
                     f"({'/'.join(map(str, mid_steps))}) | **{fmt(points['end'])}** | {fmt(pass_k)} | {entropy_end:.3f} | "
                     f"{kl:.4f} | {delta:+.3f} | {clip:.3f} | {' | '.join(shares)} |")
    lines += ["", "Paired differences of final held-out pass@1 (points), per seed, mean [95 % t-interval over seeds]:", "",
              "| staleness | stable-pess − ppo | stable-pess − pmd-mean | stable-pess − oapl | seeds |", "|---|---:|---:|---:|---|"]
    for staleness in [s for s in STALENESS_ORDER if ("stable-pess", s) in final]:
        row, used = [], set()
        for other in ("ppo", "pmd-mean", "oapl"):
            if (other, staleness) not in final:
                row.append("–")
                continue
            seeds = sorted(set(final[("stable-pess", staleness)]) & set(final[(other, staleness)]))
            used |= set(seeds)
            row.append(interval([final[("stable-pess", staleness)][s] - final[(other, staleness)][s] for s in seeds]) if seeds else "–")
        lines.append(f"| {staleness} | {' | '.join(row)} | {','.join(map(str, sorted(used)))} |")
    lines += ["", "Continuity control at lag 8, final pass@1 resumed − fresh AdamW (points), paired by seed:", ""]
    for objective in ("stable-pess", "ppo"):
        a, b = final.get((objective, "lag8"), {}), final.get((objective, "lag8-fresh"), {})
        seeds = sorted(set(a) & set(b))
        if seeds:
            lines.append(f"* {objective}: {interval([a[s] - b[s] for s in seeds])} (seeds {','.join(map(str, seeds))})")
    return "\n".join(lines) + "\n"


COLOURS = {o: f"C{i}" for i, o in enumerate(OBJECTIVE_ORDER)}


def plot(runs, evals, steps, groups, out: Path) -> None:
    """pass1.png, diagnostics.png and regimes.png in `out`: one line (or bar) per cell (objective, staleness),
    its band the std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    cells: dict[tuple[str, str], list[str]] = {}
    for run in runs:
        cells.setdefault((run["objective"], run["staleness"]), []).append(run["cell"])
    plot_pass1(cells, evals, out / "pass1.png")
    plot_diagnostics(cells, steps, out / "diagnostics.png")
    plot_regimes(cells, groups.to_pylist() if groups is not None else [], out / "regimes.png")


def band(ax, key: tuple[str, str], names: list[str], rows, x: str, y: str, scale: float = 1.0,
         colours: dict[str, str] = COLOURS) -> None:
    """The mean over a cell's seeds (runs `names`) of `y` against `x`, shaded ± one std when seeds > 1; the line's
    colour is its objective's in `colours`, its style its staleness's."""
    import numpy as np

    series = [[r for r in rows if r["cell"] == c] for c in names]
    length = min(len(s) for s in series)
    xs = np.array([r[x] for r in series[0][:length]], float)
    ys = np.array([[scale * r[y] for r in s[:length]] for s in series], float)
    mean = ys.mean(0)
    ax.plot(xs, mean, color=colours.get(key[0], "k"), linestyle=LINESTYLES.get(key[1], "-"),
            label=f"{key[0]} {key[1]} (n={len(names)})", marker="o" if x != "global_step" else None, markersize=3)
    if len(names) > 1:
        std = ys.std(0, ddof=1)
        ax.fill_between(xs, mean - std, mean + std, color=colours.get(key[0], "k"), alpha=0.12, linewidth=0)


def save_with_legend(fig, axes, path: Path) -> None:
    """One legend for all panels (the first panel's lines), outside on the right."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_pass1(cells, evals, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    for key, names in sorted(cells.items()):
        band(axes[0], key, names, evals, "optimizer_steps", "pass1", 100)
        band(axes[1], key, names, evals, "completions", "pass1", 100)
    axes[0].set(xlabel="optimiser steps", ylabel="held-out pass@1 (%), mean ± std over seeds")
    axes[1].set(xlabel="completions generated", ylabel="held-out pass@1 (%)")
    save_with_legend(fig, axes, path)


def plot_diagnostics(cells, steps, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(19, 5.5))
    for key, names in sorted(cells.items()):
        for ax, column in zip(axes, ("entropy", "kl_behaviour", "log_ratio_mean")):
            band(ax, key, names, steps, "global_step", column)
    for ax, label in zip(axes, ("token entropy of π_θ (nats)", "KL(π_b‖π_θ) per token (k3)",
                                "mean signed Δ = log π_θ − log π_b per sequence")):
        ax.set(xlabel="optimiser step", ylabel=label)
    axes[2].axhline(0, color="black", linewidth=0.8)
    save_with_legend(fig, axes, path)


def plot_regimes(cells, groups: list[dict], path: Path) -> None:
    """Left: the share of each Lambert regime among the groups of each regression cell; right: the mean signed
    Δ of every cell's groups when used."""
    import matplotlib.pyplot as plt
    import numpy as np

    of_cell: dict[tuple[str, str], list[dict]] = {key: [] for key in cells}  # one pass over the groups
    for g in groups:
        of_cell.get((g["objective"], g["staleness"]), []).append(g)
    regression = [k for k in sorted(cells) if k[0] not in ("ppo", "pg")]
    fig, (shares, deltas) = plt.subplots(1, 2, figsize=(16, 5.5))
    labels = [f"{o}\n{s}" for o, s in regression]
    bottom = np.zeros(len(regression))
    for j, regime in enumerate(("pessimistic", "boundary", "optimistic")):
        values = [100 * sum(1 for g in of_cell[key] if g["regime"].startswith(regime)) / max(len(of_cell[key]), 1)
                  for key in regression]
        shares.bar(labels, values, bottom=bottom, color=f"C{j + 5}", label=regime, edgecolor="black", linewidth=0.3)
        bottom += np.array(values)
    shares.set(ylabel="groups (%)", title="Lambert regime of the groups, per cell (all seeds)")
    shares.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    shares.tick_params(axis="x", labelsize=7, labelrotation=45)
    keys = sorted(cells)
    means = [np.mean([g["log_ratio_mean"] for g in of_cell[key]]) for key in keys]
    deltas.bar([f"{o}\n{s}" for o, s in keys], means, color=[COLOURS.get(o, "k") for o, _ in keys])
    deltas.axhline(0, color="black", linewidth=0.8)
    deltas.set(ylabel="mean signed Δ of groups when used (nats)", title="mass leaving the sampled completions (Δ < 0)")
    deltas.tick_params(axis="x", labelsize=7, labelrotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_csvs(out: Path, tables: dict[str, list[dict]]) -> None:
    """Each table (a list of rows with the same keys) as out/NAME, header first."""
    import csv

    out.mkdir(parents=True, exist_ok=True)
    for name, rows in tables.items():
        with open(out / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def main(argv=None) -> None:
    import pyarrow.parquet as pq

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs/experiments"))
    args = parser.parse_args(argv)
    runs, evals, steps, groups = collect(args.grid)
    if not runs:
        raise SystemExit(f"{args.grid}: no finished cells (directories named objective-staleness-seedN with iterate.json)")
    write_csvs(args.out, {"evals.csv": evals, "steps.csv": steps})
    pq.write_table(groups, args.out / "groups.parquet", compression="zstd")
    summary = summarise(runs, evals, steps, groups)
    (args.out / "summary.md").write_text(f"Cells that ran ({len(runs)}): {', '.join(r['cell'] for r in runs)}\n\n" + summary)
    plot(runs, evals, steps, groups, args.out)
    print(summary)


if __name__ == "__main__":
    main()
