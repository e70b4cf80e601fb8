"""SQL at scale: 10 M synthetic rollout rows across 100 versions, queried the way users and train do.

Writes a run directory of realistic shards (4 per version, list columns of ~26 tokens with their log-probs,
verdicts and scores alongside), then times, in one process, alternating repeats of:

  * `roll sql`'s per-version aggregate over every rollout row (the user's query, through roll.store.query);
  * train's lag-window selection (the named query `window_samples` over a 4-version window), with 10 and
    with 100 versions of history present — the window reads only its own versions' files.

    python bench/sql_scale.py [--rows 10000000] [--versions 100] [--repeats 5] [--dir /tmp/roll-sql-bench]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow as pa


def list_column(rng, lengths: np.ndarray, dtype, make) -> pa.Array:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = make(rng, int(offsets[-1])).astype(dtype)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def write_history(run, versions: int, rows_per_version: int, shards: int, seed: int = 0) -> None:
    from roll.store import SCHEMAS, Shard, write_table

    rng = np.random.default_rng(seed)
    per_shard = rows_per_version // shards
    for version in range(versions):
        for index in range(shards):
            n = per_shard
            ids = np.arange(n)
            prompt = pa.array([f"p{version}-{index}-{i // 8}" for i in ids])
            sample = pa.array(ids % 8, pa.int64())
            lengths = rng.integers(10, 49, n)
            key = {"policy_version": pa.array(np.full(n, version), pa.int64()), "prompt_id": prompt, "sample_index": sample}
            shard = Shard(index, shards)
            rollouts = {
                **key, "completion": pa.array(["1+2=3\nanswer: 3"] * n),
                "prompt_token_ids": list_column(rng, np.full(n, 12), np.int32, lambda r, k: r.integers(0, 50, k)),
                "token_ids": list_column(rng, lengths, np.int32, lambda r, k: r.integers(0, 50, k)),
                "behaviour_logprobs": list_column(rng, lengths, np.float32, lambda r, k: -r.exponential(0.3, k)),
                "num_tokens": pa.array(lengths, pa.int64()), "finish_reason": pa.array(["stop"] * n),
                "max_new_tokens": pa.array(np.full(n, 48), pa.int64()), "temperature": pa.array(np.ones(n)),
                "top_p": pa.array(np.ones(n)), "seed": pa.array(np.full(n, 7), pa.int64()), "backend": pa.array(["hf"] * n),
            }
            write_table(run.shard_path("rollouts", version, shard), "rollouts", pa.table(rollouts, schema=SCHEMAS["rollouts"]))
            correct = rng.random(n) < 0.3
            verdicts = {**key, "reward": pa.array(correct.astype(float)), "correct": pa.array(correct),
                        "extracted_answer": pa.array(["3"] * n), "format_ok": pa.array(np.ones(n, bool)),
                        "verifier": pa.array(["arith 1"] * n), "milliseconds": pa.array(np.zeros(n)), "error": pa.array([""] * n)}
            write_table(run.shard_path("verdicts", version, shard), "verdicts", pa.table(verdicts, schema=SCHEMAS["verdicts"]))
            zeros = pa.array(np.zeros(n))
            scores = {**key, "behaviour_logprob_sum": zeros, "ref_logprob_sum": zeros, "mismatch_max_abs": zeros,
                      "mismatch_kl": zeros,
                      "trainer_logprobs": list_column(rng, lengths, np.float32, lambda r, k: -r.exponential(0.3, k)),
                      "ref_logprobs": list_column(rng, lengths, np.float32, lambda r, k: -r.exponential(0.3, k)),
                      "group_size": pa.array(np.full(n, 8), pa.int64()), "group_reward_mean": zeros, "group_reward_std": zeros}
            write_table(run.shard_path("scores", version, shard), "scores", pa.table(scores, schema=SCHEMAS["scores"]))


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--versions", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default="/tmp/roll-sql-bench")
    args = parser.parse_args()

    from roll.store import Run, named_query, query

    base = Path(args.dir)
    shutil.rmtree(base, ignore_errors=True)
    big, small = Run(base / "history100"), Run(base / "history10")
    rows_per_version = args.rows // args.versions
    started = time.perf_counter()
    write_history(big, args.versions, rows_per_version, shards=4)
    write_history(small, 10, rows_per_version, shards=4)
    print(f"wrote {args.versions} + 10 versions of {rows_per_version} rows in {time.perf_counter() - started:.0f} s")

    aggregate = "select policy_version, count(*), avg(num_tokens) from rollouts group by 1 order by 1"
    assert sum(r[1] for r in query(big, aggregate).fetchall()) == rows_per_version * args.versions

    def window(run, hi):
        return lambda: named_query(run, "window_samples", versions=range(hi - 3, hi + 1), lo=hi - 3, hi=hi)

    results = {"aggregate over all rows": [], "window of 4 versions, 10 versions of history": [],
               f"window of 4 versions, {args.versions} versions of history": []}
    for _ in range(args.repeats):  # alternate, so drift hits every query alike
        results["aggregate over all rows"] += timed(lambda: query(big, aggregate).fetchall(), 1)
        results["window of 4 versions, 10 versions of history"] += timed(window(small, 9), 1)
        results[f"window of 4 versions, {args.versions} versions of history"] += timed(window(big, args.versions - 1), 1)
    print(f"\n{args.rows:,} rollout rows over {args.versions} versions (4 shards each), {args.repeats} alternating repeats\n")
    print("| query | median s | min–max s |")
    print("|---|---:|---:|")
    for name, values in results.items():
        print(f"| {name} | {statistics.median(values):.3f} | {min(values):.3f}–{max(values):.3f} |")
    rows = len(window(big, args.versions - 1)())
    print(f"\nwindow rows returned: {rows:,} (4 × {rows_per_version:,})")


if __name__ == "__main__":
    main()
