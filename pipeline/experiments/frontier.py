"""The tables and plots of EXPERIMENTS.md's staleness frontier (issue 20), from the runs of
`python -m roll.pipeline.experiments.grid runs/frontier --grid frontier`.

    python -m roll.pipeline.experiments.frontier runs/frontier --out docs/frontier
    python -m roll.pipeline.experiments.frontier runs/frontier --earlier docs/frontier --out docs/frontier
    python -m roll.pipeline.experiments.frontier runs/chain --out docs/chain      (issue 24's chain grid)

Reads every finished cell (variant-staleness-seedN with iterate.json) through the same SQL as the first grid
(pipeline/experiments/experiment.py); with --earlier, also the cells of earlier tables (a directory this wrote)
that the grid directory does not hold — a grid's run directories go with their machine, its committed tables
stay. A cell in both is read from its run directory. The tables hold the variants, staleness kinds and
evaluation steps the cells have (the chain grid: four variants, lag0 and lag32, 64 steps). Writes into --out:

    evals.csv         per cell and evaluated version: optimiser steps, pass@1 and its standard error, pass@k
    steps.csv         every optimiser step of every cell (the steps table, with the cell)
    regimes.csv       per cell and version: groups per Lambert regime, mean k, mean signed Δ
    summary.md        mean ± std over seeds per cell, collapse flags, diagnostics, paired 95 % intervals of
                      the pairs, of each variant's loss to staleness and of what staleness does to a pair
    pass1.png         held-out pass@1 against optimiser steps, one panel per staleness kind
    diagnostics.png   ESS share, (log ρ)², masked or clipped share, Δ, KL(π_b‖π_θ), entropy per step
"""
from __future__ import annotations

import argparse
from pathlib import Path

from roll.pipeline.experiments.experiment import band, collect, fmt, interval, mean_std, write_csvs
from roll.pipeline.report import collapsed

VARIANTS = ("ppo", "decoupled-ppo", "m2po", "pmd-mean", "stable-pess", "stable-pess-parent", "oapl", "oapl-shift")
STALENESS = ("lag0", "lag32", "sync32", "offline96")
# lag 0 has one cell for variants equal there by construction (tests): their lag-0 stand-in
AT_LAG0 = {"decoupled-ppo": "ppo", "m2po": "ppo", "stable-pess-parent": "stable-pess"}
PAIRS = (("stable-pess", "ppo"), ("stable-pess", "m2po"), ("stable-pess-parent", "stable-pess"),
         ("oapl-shift", "oapl"), ("decoupled-ppo", "ppo"), ("m2po", "ppo"), ("stable-pess-parent", "ppo"))
DIAGNOSTICS = (("ess", "ESS share of e^Δ"), ("log_ratio_sq_mean", "token-mean (log ρ)²"),
               ("clip_fraction", "masked or clipped token share"), ("log_ratio_mean", "mean signed Δ per sequence"),
               ("kl_behaviour", "KL(π_b‖π_θ) per token (k3)"), ("entropy", "token entropy of π_θ (nats)"))


def finals(runs, by_run) -> dict[tuple[str, str], dict[int, float]]:
    """Final pass@1 (points) per (variant, staleness) and seed; lag 0 of a variant equal to another there is
    the other's cell."""
    out: dict[tuple[str, str], dict[int, float]] = {}
    for run in runs:
        out.setdefault((run["objective"], run["staleness"]), {})[run["seed"]] = 100 * by_run[run["cell"]][-1]["pass1"]
    for variant, same in AT_LAG0.items():
        if (same, "lag0") in out:
            out.setdefault((variant, "lag0"), out[(same, "lag0")])
    return out


def present(runs) -> tuple[list[str], list[str]]:
    """The variants and the staleness kinds (lag0 first) that the cells ran, in the tables' order."""
    return ([v for v in VARIANTS if any(r["objective"] == v for r in runs)],
            [s for s in STALENESS if any(r["staleness"] == s for r in runs)])


def summarise(runs, evals, steps) -> str:
    variants, kinds = present(runs)
    evaluated = sorted({row["optimizer_steps"] for row in evals})
    pairs = [(a, b) for a, b in PAIRS if a in variants and b in variants]
    by_run: dict[str, list[dict]] = {}
    for row in evals:
        by_run.setdefault(row["cell"], []).append(row)
    cells: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        cells.setdefault((run["objective"], run["staleness"]), []).append(run)
    steps_of: dict[str, list[dict]] = {}
    for s in steps:
        steps_of.setdefault(s["cell"], []).append(s)
    lines = [f"| variant | staleness | seeds | pass@1 step {' | '.join(str(n) for n in evaluated)} | collapsed | "
             "ESS share | (log ρ)² | masked/clipped | Δ mean | KL(π_b‖π_θ) | entropy |",
             "|---|---|---|" + "---:|" * (len(evaluated) + 7)]
    for key in sorted(cells, key=lambda k: (STALENESS.index(k[1]), VARIANTS.index(k[0]))):
        members = sorted(cells[key], key=lambda r: r["seed"])
        evaluations = [by_run[r["cell"]] for r in members]
        points = [fmt(mean_std([100 * e[j]["pass1"] for e in evaluations])) if all(len(e) > j for e in evaluations)
                  else "–" for j in range(len(evaluated))]
        # diagnostics: means over the last third of each cell's steps, then over seeds
        tail = [s for r in members for s in steps_of[r["cell"]][len(steps_of[r["cell"]]) * 2 // 3:]]
        diag = [sum(s[name] for s in tail) / len(tail) for name, _ in DIAGNOSTICS]
        lines.append(f"| {key[0]} | {key[1]} | {','.join(str(r['seed']) for r in members)} | {' | '.join(points[:-1])} | "
                     f"**{points[-1]}** | {sum(collapsed(e) for e in evaluations)}/{len(members)} | {diag[0]:.3f} | "
                     f"{diag[1]:.4f} | {diag[2]:.3f} | {diag[3]:+.3f} | {diag[4]:.4f} | {diag[5]:.3f} |")
    final = finals(runs, by_run)
    stand_ins = [f"{v} is {same}'s cell" for v, same in AT_LAG0.items() if v in variants]
    lines += ["", "Paired differences of final held-out pass@1 (points), mean [95 % t-interval over the seeds both "
              "cells ran]" + (f"; at lag 0, {', '.join(stand_ins)}" if stand_ins else "") + ":", "",
              "| staleness | " + " | ".join(f"{a} − {b}" for a, b in pairs) + " |", "|---|" + "---:|" * len(pairs)]
    for staleness in kinds:
        row = []
        for a, b in pairs:
            if staleness == "lag0" and AT_LAG0.get(a, a) == AT_LAG0.get(b, b):
                row.append("0 (the same cell)")
                continue
            text, n = paired(final, [(a, staleness), (b, staleness)], lambda x, y: x - y)
            row.append(text + (f" (n={n})" if n > 1 else ""))
        lines.append(f"| {staleness} | {' | '.join(row)} |")
    if len(kinds) > 1 and kinds[0] == "lag0":  # the two tables against lag 0, where it and a stale kind ran
        lines += against_lag0(variants, pairs, kinds[1:], final)
    return "\n".join(lines) + "\n"


def paired(final, keys, combine) -> tuple[str, int]:
    """mean [95 % t-interval] of combine(…) of the final pass@1 of the cells `keys` ((variant, staleness) each),
    seed by seed over the seeds all of them ran ("–" where none), and how many seeds that is."""
    series = [final.get(key, {}) for key in keys]
    seeds = sorted(set.intersection(*(set(values) for values in series)))
    return (interval([combine(*(values[s] for values in series)) for s in seeds]) if seeds else "–"), len(seeds)


def against_lag0(variants, pairs, stale_kinds, final) -> list[str]:
    """Each variant's loss to staleness, and what staleness does to a pair: (a − b at the stale kind) − (a − b
    at lag 0), seed by seed (EXPERIMENTS.md's C3). A pair that is one cell at lag 0 has the latter in the table
    of differences already, so it is left out."""
    lines = ["", "Loss to staleness, final pass@1 at lag 0 − at the stale kind (points), paired by seed:", "",
             "| variant | " + " | ".join(stale_kinds) + " |", "|---|" + "---:|" * len(stale_kinds)]
    for variant in variants:
        row = [paired(final, [(variant, "lag0"), (variant, staleness)], lambda x, y: x - y)[0]
               for staleness in stale_kinds]
        lines.append(f"| {variant} | {' | '.join(row)} |")
    moved = [(a, b) for a, b in pairs if AT_LAG0.get(a, a) != AT_LAG0.get(b, b)]
    if moved:
        lines += ["", "What staleness does to a pair, (a − b at the stale kind) − (a − b at lag 0) (points), paired "
                  "by seed:", "", "| pair | " + " | ".join(stale_kinds) + " |", "|---|" + "---:|" * len(stale_kinds)]
    for a, b in moved:
        row = [paired(final, [(a, staleness), (b, staleness), (a, "lag0"), (b, "lag0")],
                      lambda a_stale, b_stale, a_fresh, b_fresh: (a_stale - b_stale) - (a_fresh - b_fresh))[0]
               for staleness in stale_kinds]
        lines.append(f"| {a} − {b} | {' | '.join(row)} |")
    return lines


def regime_rows(groups) -> list[dict]:
    """Per cell and policy version: groups per Lambert regime, mean k (finite ones) and mean signed Δ."""
    import duckdb

    con = duckdb.connect()
    con.register("g", groups)
    query = """SELECT cell, objective AS variant, staleness, seed, policy_version,
                      count(*) FILTER (WHERE regime = 'pessimistic') AS pessimistic,
                      count(*) FILTER (WHERE regime = 'boundary') AS boundary,
                      count(*) FILTER (WHERE regime LIKE 'optimistic%') AS optimistic,
                      avg(k) FILTER (WHERE isfinite(k)) AS k_mean, avg(log_ratio_mean) AS delta_mean
               FROM g GROUP BY ALL ORDER BY cell, policy_version"""
    cursor = con.execute(query)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def save(fig, axes, path: Path) -> None:
    """One legend of the variants drawn in any panel (a panel per staleness kind holds only some), on the right."""
    import matplotlib.pyplot as plt

    shown = {}
    for ax in axes:
        ax.grid(alpha=0.3)
        for handle, label in zip(*ax.get_legend_handles_labels()):
            shown.setdefault(label.split()[0], handle)
    order = [v for v in VARIANTS if v in shown]
    fig.legend([shown[v] for v in order], order, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=9,
               frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot(runs, evals, steps, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {v: f"C{i}" for i, v in enumerate(VARIANTS)}
    cells: dict[tuple[str, str], list[str]] = {}
    for run in runs:
        cells.setdefault((run["objective"], run["staleness"]), []).append(run["cell"])
    _, kinds = present(runs)
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 5.5), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, staleness in zip(axes, kinds):
        for key, names in sorted(cells.items(), key=lambda kv: VARIANTS.index(kv[0][0])):
            if key[1] == staleness:
                band(ax, key, names, evals, "optimizer_steps", "pass1", 100, colours)
        ax.set(title=staleness, xlabel="optimiser steps", ylabel="held-out pass@1 (%), mean ± std over seeds")
    save(fig, list(axes), out / "pass1.png")
    fig, axes = plt.subplots(len(DIAGNOSTICS), len(kinds), figsize=(5.5 * len(kinds), 4 * len(DIAGNOSTICS)),
                             sharex=True, squeeze=False)
    for j, staleness in enumerate(kinds):
        for key, names in sorted(cells.items(), key=lambda kv: VARIANTS.index(kv[0][0])):
            if key[1] == staleness:
                for i, (column, _) in enumerate(DIAGNOSTICS):
                    band(axes[i][j], key, names, steps, "global_step", column, colours=colours)
        axes[0][j].set_title(staleness)
    for i, (_, label) in enumerate(DIAGNOSTICS):
        axes[i][0].set_ylabel(label)
    for ax in axes[-1]:
        ax.set_xlabel("optimiser step")
    save(fig, [ax for row in axes for ax in row], out / "diagnostics.png")


def earlier_cells(directory: Path, fresh: set[str]):
    """(runs, evals, steps, regimes) of the cells in directory's evals/steps/regimes CSVs not named in fresh."""
    from pyarrow import csv

    def read(name: str) -> list[dict]:
        return [row for row in csv.read_csv(directory / name).to_pylist() if row["cell"] not in fresh]

    evals, steps, regimes = read("evals.csv"), read("steps.csv"), read("regimes.csv")
    runs = {row["cell"]: {key: row[key] for key in ("cell", "objective", "staleness", "seed")} for row in evals}
    # steps tables written before collect() named the variant there held the loss's name (stable-pess for
    # stable-pess-parent): the variant is the cell's
    steps = [{**row, "objective": runs[row["cell"]]["objective"]} for row in steps]
    return list(runs.values()), evals, steps, regimes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs/frontier"))
    parser.add_argument("--earlier", type=Path, help="add the cells of this earlier --out that the grid lacks")
    args = parser.parse_args(argv)
    runs, evals, steps, groups = collect(args.grid)
    regimes = regime_rows(groups) if groups is not None else []
    if args.earlier:
        more = earlier_cells(args.earlier, {run["cell"] for run in runs})
        runs, evals, steps, regimes = (sorted(a + b, key=lambda row: row["cell"]) for a, b in
                                       zip((runs, evals, steps, regimes), more))
    if not runs:
        raise SystemExit(f"{args.grid}: no finished cells (directories named variant-staleness-seedN with iterate.json)")
    write_csvs(args.out, {"evals.csv": evals, "steps.csv": steps, "regimes.csv": regimes})
    summary = summarise(runs, evals, steps)
    (args.out / "summary.md").write_text(f"Cells that ran ({len(runs)}): {', '.join(r['cell'] for r in runs)}\n\n"
                                         + summary)
    plot(runs, evals, steps, args.out)
    print(summary)


if __name__ == "__main__":
    main()
