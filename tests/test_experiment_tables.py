"""The frontier tables script (pipeline/experiments/frontier.py) on a chain-shaped grid: four variants, lag0 and
lag32, evaluations at 0, 32 and 64 steps. Its paired intervals are checked against a hand computation."""
from roll.pipeline.experiments.experiment import write_csvs
from roll.pipeline.experiments.frontier import DIAGNOSTICS, earlier_cells, summarise

# final pass@1 (fraction) per (variant, staleness) and seed; the lag-0 equals of ppo and stable-pess are not run
FINALS = {("ppo", "lag0"): (0.40, 0.44, 0.42), ("stable-pess", "lag0"): (0.41, 0.45, 0.43),
          ("ppo", "lag32"): (0.30, 0.32, 0.34), ("stable-pess", "lag32"): (0.32, 0.36, 0.40),
          ("stable-pess-parent", "lag32"): (0.38, 0.38, 0.38), ("decoupled-ppo", "lag32"): (0.20, 0.22, 0.24)}


def chain_shaped_grid():
    runs, evals, steps = [], [], []
    for (variant, staleness), finals in FINALS.items():
        for seed, final in enumerate(finals):
            cell = f"{variant}-{staleness}-seed{seed}"
            runs.append({"cell": cell, "objective": variant, "staleness": staleness, "seed": seed})
            for n, pass1 in ((0, 0.25), (32, (0.25 + final) / 2), (64, final)):
                evals.append({"cell": cell, "optimizer_steps": n, "pass1": pass1, "pass1_se": 0.01})
            steps += [{"cell": cell, "global_step": g, **{name: 0.5 for name, _ in DIAGNOSTICS}} for g in range(3)]
    return runs, evals, steps


def subset(grid, keep):
    """The runs, evals and steps of the cells whose run `keep` accepts."""
    runs, evals, steps = grid
    runs = [r for r in runs if keep(r)]
    kept = {r["cell"] for r in runs}
    return runs, [e for e in evals if e["cell"] in kept], [s for s in steps if s["cell"] in kept]


def test_chain_tables_hold_its_evaluation_steps_variants_and_kinds_with_hand_computed_intervals():
    text = summarise(*chain_shaped_grid())
    header = text.splitlines()[0]
    assert header.startswith("| variant | staleness | seeds | pass@1 step 0 | 32 | 64 | collapsed |")
    # the final column is the last evaluation: ppo at lag 32, mean 32.0, std 2.0 (points)
    assert "| ppo | lag32 | 0,1,2 | 25.0 ± 0.0 | 28.5 ± 1.0 | **32.0 ± 2.0** | 0/3 |" in text
    # paired differences; 95 % half-width = t(2) · std / √3 with t(2) = 4.303
    # stable-pess − ppo at lag32: differences 2, 4, 6 → mean 4, std 2, half 4.969
    # parent − stable-pess at lag32: 6, 2, −2 → mean 2, std 4, half 9.937
    # decoupled-ppo − ppo at lag32: −10, −10, −10 → std 0
    # parent − ppo at lag32: 8, 6, 4 → mean 6, std 2, half 4.969
    lag32 = next(line for line in text.splitlines() if line.startswith("| lag32 |"))
    assert lag32 == ("| lag32 | +4.0 [-1.0, +9.0] (n=3) | +2.0 [-7.9, +11.9] (n=3) | -10.0 [-10.0, -10.0] (n=3) | "
                     "+6.0 [+1.0, +11.0] (n=3) |")
    lag0 = next(line for line in text.splitlines() if line.startswith("| lag0 |"))
    # stable-pess − ppo at lag 0: 1, 1, 1; parent − stable-pess and decoupled-ppo − ppo are one cell there;
    # parent − ppo there is stable-pess's cell against ppo's: 1, 1, 1
    assert lag0 == ("| lag0 | +1.0 [+1.0, +1.0] (n=3) | 0 (the same cell) | 0 (the same cell) | "
                    "+1.0 [+1.0, +1.0] (n=3) |")
    # only the kinds and variants that ran: no sync32 or offline96 column, no m2po or oapl pair
    assert "sync32" not in text and "offline96" not in text and "m2po" not in text and "oapl" not in text
    # loss to staleness, ppo: 40−30, 44−32, 42−34 = 10, 12, 8 → mean 10, std 2, half 4.969
    assert "| ppo | +10.0 [+5.0, +15.0] |" in text
    # what staleness does to a pair, only for pairs that are two cells at lag 0:
    # stable-pess − ppo: lag32 2, 4, 6 less lag0 1, 1, 1 → 1, 3, 5 → mean 3, std 2, half 4.969
    # stable-pess-parent − ppo: lag32 8, 6, 4 less lag0 (stable-pess's cell) 1, 1, 1 → 7, 5, 3 → mean 5
    moved = text.split("What staleness does to a pair")[1].splitlines()
    assert "| stable-pess − ppo | +3.0 [-2.0, +8.0] |" in moved
    assert "| stable-pess-parent − ppo | +5.0 [+0.0, +10.0] |" in moved
    assert not any(line.startswith(("| decoupled-ppo − ppo", "| stable-pess-parent − stable-pess")) for line in moved)


def test_lag0_stand_in_clause_only_where_a_stand_in_ran():
    text = summarise(*subset(chain_shaped_grid(), lambda r: r["objective"] in ("ppo", "stable-pess")))
    assert "over the seeds both cells ran]:" in text and "at lag 0, " not in text
    assert ("ran]; at lag 0, decoupled-ppo is ppo's cell, stable-pess-parent is stable-pess's cell:"
            in summarise(*chain_shaped_grid()))


def test_without_lag0_no_table_against_it_and_one_seed_is_said_once():
    """A grid that has run only lag32 cells, seed 0 (the chain grid's first cells): no loss-to-staleness table
    (it would have no columns), and a one-seed difference reads "(one seed)" without "(n=1)"."""
    text = summarise(*subset(chain_shaped_grid(), lambda r: r["staleness"] == "lag32" and r["seed"] == 0))
    assert "Loss to staleness" not in text and "What staleness does" not in text
    lag32 = next(line for line in text.splitlines() if line.startswith("| lag32 |"))
    # seed 0: stable-pess − ppo 32 − 30, parent − stable-pess 38 − 32, decoupled-ppo − ppo 20 − 30, parent − ppo 38 − 30
    assert lag32 == "| lag32 | +2.0 (one seed) | +6.0 (one seed) | -10.0 (one seed) | +8.0 (one seed) |"


def test_earlier_tables_name_each_step_by_its_cells_variant(tmp_path):
    """Committed steps.csv files written before the fix held the loss's name in `objective` (stable-pess for a
    stable-pess-parent cell); read back as earlier cells, every step row carries its cell's variant."""
    runs, evals, steps = subset(chain_shaped_grid(), lambda r: r["staleness"] == "lag32" and r["seed"] == 0)
    variant = {r["cell"]: r["objective"] for r in runs}
    loss = {"stable-pess-parent": "stable-pess"}
    old_steps = [{**s, "objective": loss.get(variant[s["cell"]], variant[s["cell"]])} for s in steps]
    write_csvs(tmp_path, {"evals.csv": [{**e, "objective": variant[e["cell"]], "staleness": "lag32", "seed": 0}
                                        for e in evals],
                          "steps.csv": old_steps,
                          "regimes.csv": [{"cell": cell, "variant": v, "policy_version": 0} for cell, v in variant.items()]})
    _, _, read_steps, _ = earlier_cells(tmp_path, fresh=set())
    assert len(read_steps) == len(steps) and {s["objective"] for s in old_steps} == {"ppo", "stable-pess", "decoupled-ppo"}
    assert [s["objective"] for s in read_steps] == [variant[s["cell"]] for s in read_steps]
    assert "stable-pess-parent" in {s["objective"] for s in read_steps}
