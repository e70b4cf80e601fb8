"""The table of EXPERIMENTS.md: one row per run of a lag grid, every number by SQL over the run's tables.

    python -m roll.pipeline.experiment_table runs/grid
"""
import sys
from pathlib import Path
from roll.store import Run
rows = []
for d in sorted(Path(sys.argv[1]).glob("*-seed*")):
    r = Run(d)
    con = r.connect()
    ev = dict(con.execute("select policy_version, avg(correct::double) from evals group by 1").fetchall())
    p4 = con.execute("select avg(c) from (select prompt_id, max(correct::int) c from evals where policy_version = (select max(policy_version) from evals) group by 1)").fetchone()[0]
    obj, lag = con.execute("select any_value(objective), max(lag) from groups").fetchone()
    lastv = con.execute("select max(policy_version) from steps").fetchone()[0]
    ent_end = con.execute("select avg(entropy) from steps where policy_version = ?", [lastv]).fetchone()[0]
    ent0 = con.execute("select avg(entropy) from steps where policy_version = 1").fetchone()[0]
    kl, clip, ess, rmax = con.execute("select avg(kl_behaviour), avg(clip_fraction), avg(ess), max(ratio_max) from steps").fetchone()
    reg = dict(con.execute("select regime, count(*) from groups group by 1").fetchall())
    tot = sum(reg.values())
    medk = con.execute("select median(k) from groups where not isnan(k)").fetchone()[0]
    train_r = con.execute("select avg(reward_mean) from groups where data_version >= 15").fetchone()[0]
    rows.append((obj, lag, ev.get(0), ev.get(10), ev.get(20), p4, ent0, ent_end, kl, clip, ess, rmax, reg, tot, medk, train_r))
order = {"ppo": 0, "pg": 1, "oapl": 2, "pmd-mean": 3, "stable-pess": 4}
rows.sort(key=lambda x: (x[1], order.get(x[0], 9)))
print("| objective | lag | pass@1 v0 | v10 | v20 | pass@4 v20 | entropy v1 → v20 | mean KL(π_b‖π_θ) | mean clip frac | mean ESS | max ratio | pessimistic | boundary | optimistic | median k |")
print("|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for (obj, lag, a, b, c, p4, e0, e1, kl, clip, ess, rmax, reg, tot, medk, tr) in rows:
    share = lambda k: f"{100 * sum(v for n, v in reg.items() if n.startswith(k)) / tot:.0f}%" if "n/a" not in reg else "n/a"
    mk = f"{medk:.2f}" if medk is not None else "n/a"
    print(f"| {obj} | {lag} | {100*a:.1f} | {100*b:.1f} | {100*c:.1f} | {100*p4:.1f} | {e0:.3f} → {e1:.3f} | {kl:.4f} | {clip:.3f} | {ess:.3f} | {rmax:.2f} | {share('pessimistic')} | {share('boundary')} | {share('optimistic')} | {mk} |")
