#!/usr/bin/env bash
# The lag experiment of EXPERIMENTS.md as plain roll commands: one run directory per objective x lag x seed,
# lag-major so that an interrupted grid still compares every objective at the lags it reached. Rerunning
# resumes: every stage skips what is committed. Usage: bash pipeline/lag_grid.sh [OUT] [SEEDS] [LAGS]
set -euo pipefail
out=${1:-runs/grid}
seeds=${2:-"0 1 2"}
lags=${3:-"0 2 4 8"}
for lag in $lags; do
  for seed in $seeds; do
    for objective in ppo pg oapl pmd-mean stable-pess; do
      run="$out/$objective-lag$lag-seed$seed"
      [ -f "$run/run.toml" ] || roll init --run "$run" > /dev/null
      roll iterate --run "$run" --iterations 20 --objective "$objective" --lag "$lag" --seed "$seed" \
        --eval-every 10 > "$run/iterate.json"
    done
  done
done
roll report $(for d in "$out"/*/; do [ -f "$d/iterate.json" ] && printf -- '--run %s ' "$d"; done) --out "$out/report" > /dev/null
