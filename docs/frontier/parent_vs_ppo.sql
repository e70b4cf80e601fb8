-- stable-pess-parent − ppo, final held-out pass@1 (points), paired by seed: mean [95 % t-interval, n = 3]
-- (EXPERIMENTS.md, staleness frontier; the same interval as summary.md's pairs, t(2) = 4.303)
WITH final AS (SELECT objective, staleness, seed, 100 * arg_max(pass1, optimizer_steps) AS p
               FROM 'docs/frontier/evals.csv' GROUP BY ALL),
d AS (SELECT a.staleness, a.seed, a.p - b.p AS diff FROM final a JOIN final b USING (staleness, seed)
      WHERE a.objective = 'stable-pess-parent' AND b.objective = 'ppo')
SELECT staleness, count(*) AS n, round(avg(diff), 1) AS mean,
       round(avg(diff) - 4.303 * stddev_samp(diff) / sqrt(count(*)), 1) AS lo,
       round(avg(diff) + 4.303 * stddev_samp(diff) / sqrt(count(*)), 1) AS hi
FROM d GROUP BY staleness ORDER BY staleness;
