"""SQL at scale: 10 M synthetic rollout rows across 100 versions, queried the way users and train do.

Writes a run directory of realistic shards (4 per version, list columns of ~26 tokens with their log-probs,
verdicts and scores alongside), then times, in one process, alternating repeats of:

  * `roll sql`'s per-version aggregate over every rollout row: in process (roll.store.query … fetchall,
    what the 0.2 s target is about) and as the `roll sql` command (a subprocess: mostly start-up);
  * listing the 400 rollout files as every reader does (Run.committed_files), with the check of each file's
    footer against its place (issue 22): what a fresh `roll sql` pays for it;
  * train's lag-window selection (the named query `window_samples` over a 4-version window) through
    roll.store.named_query_arrow, with 10 and with 100 versions of history present — the window reads
    only its own versions' files;

each timing without the footer checks an earlier one cached (as a fresh process; a no-op on code from before
the checks), and afterwards the same window through named_query (rows as dicts of Python objects), to show what that
conversion costs. Ends with a Markdown table for BENCHMARKS.md, peak RSS and the history's size on disk.

    python bench/sql_scale.py [--rows 10000000] [--versions 100] [--repeats 5] [--dir /tmp/roll-sql-bench]
                              [--reuse]

--reuse keeps the histories already in --dir when their row counts match, since writing 11 M rows takes
minutes; without it (or when they do not match) --dir is wiped and written again.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
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
                "num_tokens": pa.array(lengths, pa.int64()), "finish_reason": pa.array(["stop"] * n), "stop_token_id": pa.array(np.full(n, 2), pa.int64()),
                "max_new_tokens": pa.array(np.full(n, 48), pa.int64()), "temperature": pa.array(np.ones(n)),
                "top_p": pa.array(np.ones(n)), "seed": pa.array(np.full(n, 7), pa.int64()), "backend": pa.array(["hf"] * n),
                "generation_id": pa.array([f"g{version}"] * n),
                "model_version": pa.array(np.full(n, version), pa.int64()), "source": pa.array(["generate"] * n),
            }
            write_table(run.shard_path("rollouts", version, shard), "rollouts", pa.table(rollouts, schema=SCHEMAS["rollouts"]))
            correct = rng.random(n) < 0.3
            verdicts = {**key, "reward": pa.array(correct.astype(float)), "correct": pa.array(correct),
                        "extracted_answer": pa.array(["3"] * n), "format_ok": pa.array(np.ones(n, bool)),
                        "verifier": pa.array(["arith 1"] * n), "milliseconds": pa.array(np.zeros(n)), "error": pa.array([""] * n),
                        "generation_id": pa.array([f"g{version}"] * n), "reward_terms": pa.array([None] * n, pa.string())}
            write_table(run.shard_path("verdicts", version, shard), "verdicts", pa.table(verdicts, schema=SCHEMAS["verdicts"]))
            zeros = pa.array(np.zeros(n))
            scores = {**key, "behaviour_logprob_sum": zeros, "ref_logprob_sum": zeros, "mismatch_max_abs": zeros,
                      "mismatch_kl": zeros,
                      "trainer_logprobs": list_column(rng, lengths, np.float32, lambda r, k: -r.exponential(0.3, k)),
                      "ref_logprobs": list_column(rng, lengths, np.float32, lambda r, k: -r.exponential(0.3, k)),
                      "group_size": pa.array(np.full(n, 8), pa.int64()), "group_reward_mean": zeros, "group_reward_std": zeros,
                      "generation_id": pa.array([f"g{version}"] * n),
                      "behaviour_checkpoint": pa.array(np.full(n, version), pa.int64())}
            write_table(run.shard_path("scores", version, shard), "scores", pa.table(scores, schema=SCHEMAS["scores"]))


def uncache() -> None:
    """Forget the footer checks this process made, as a fresh `roll sql` process starts without them."""
    import roll.store.commit

    for name in ("_CHECKED", "_COLUMNS", "_VERDICTS"):
        getattr(roll.store.commit, name).clear()


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        uncache()  # each timing starts as a fresh process would
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


def row_counts(run) -> tuple[int, int, int]:
    """Rows of rollouts, verdicts and scores (from Parquet footers, so cheap even at 10 M rows)."""
    from roll.store import query

    return query(run, "select (select count(*) from rollouts), (select count(*) from verdicts), "
                      "(select count(*) from scores)").fetchone()


def complete(run, rows: int) -> bool:
    # run.toml is written after every shard, so its presence says the writer finished
    return run.exists() and row_counts(run) == (rows, rows, rows)


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def machine() -> str:
    import duckdb

    cpu = platform.processor() or "?"
    try:  # the model name says more than "x86_64" when comparing numbers later
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{os.cpu_count()} cores, {platform.machine()} ({cpu}), Python {platform.python_version()}, "
            f"duckdb {duckdb.__version__}, pyarrow {pa.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--versions", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default="/tmp/roll-sql-bench")
    parser.add_argument("--reuse", action="store_true", help="keep complete histories already in --dir")
    args = parser.parse_args()

    from roll.stages.train import load_rows
    from roll.store import Run, named_query, named_query_arrow, query

    base = Path(args.dir)
    big, small = Run(base / "history100"), Run(base / "history10")
    rows_per_version = args.rows // args.versions
    total = rows_per_version * args.versions
    if args.reuse and complete(big, total) and complete(small, rows_per_version * 10):
        print(f"reusing {base}: {args.versions} + 10 versions of {rows_per_version} rows")
    else:
        if args.reuse:
            print(f"{base} holds no complete histories of this size; writing them")
        shutil.rmtree(base, ignore_errors=True)
        started = time.perf_counter()
        for run, versions in ((big, args.versions), (small, 10)):
            write_history(run, versions, rows_per_version, shards=4)
            # `roll sql` refuses a directory without run.toml; written last, it marks the history complete
            run.config_path.write_text('task = "synthetic"  # bench/sql_scale.py\n')
        print(f"wrote {args.versions} + 10 versions of {rows_per_version} rows in {time.perf_counter() - started:.0f} s")

    aggregate = "select policy_version, count(*), avg(num_tokens) from rollouts group by 1 order by 1"
    assert sum(r[1] for r in query(big, aggregate).fetchall()) == total
    # the real CLI path: the `roll` entry point installed next to this interpreter (else python -m roll)
    roll = shutil.which("roll", path=os.path.dirname(sys.executable)) or shutil.which("roll")
    roll_cmd = [roll] if roll else [sys.executable, "-m", "roll"]

    def cli(sql):
        return lambda: subprocess.run([*roll_cmd, "sql", "--run", str(big.root), sql], check=True,
                                      stdout=subprocess.DEVNULL)

    def window(run, hi, fn):
        return lambda: fn(run, "window_samples", versions=range(hi - 3, hi + 1), lo=hi - 3, hi=hi)

    hi_small, hi_big = 9, args.versions - 1
    arrow_small, arrow_big = window(small, hi_small, named_query_arrow), window(big, hi_big, named_query_arrow)
    selected = arrow_big()  # the window train gets: 4 versions' rows, list columns still Arrow lists
    assert selected.num_rows == 4 * rows_per_version and arrow_small().num_rows == 4 * rows_per_version
    assert pa.types.is_list(selected.schema.field("token_ids").type), selected.schema
    assert set(selected.column("policy_version").to_pylist()) == set(range(hi_big - 3, hi_big + 1))
    del selected

    names = {
        "agg": "per-version aggregate over all rows, in process (`roll.store.query(...).fetchall()`)",
        "cli": "per-version aggregate, `roll sql` subprocess wall time (process start-up included)",
        "cli1": "`roll sql \"select 1\"` subprocess wall time (start-up alone, for comparison)",
        "files": f"list the {args.versions * 4} rollout files with their footer checks (`Run.committed_files`, nothing cached)",
        "w10": "window of 4 versions, 10 versions of history, `named_query_arrow` (Arrow table)",
        "w100": f"window of 4 versions, {args.versions} versions of history, `named_query_arrow` (Arrow table)",
        "t10": "train's `load_rows` (the window + completeness checks + columns for torch), 10 versions of history",
        "t100": f"train's `load_rows`, {args.versions} versions of history",
        "d10": "window of 4 versions, 10 versions of history, `named_query` (list of dicts, Python objects)",
        "d100": f"window of 4 versions, {args.versions} versions of history, `named_query` (list of dicts, Python objects)",
    }
    results = {key: [] for key in names}
    for _ in range(args.repeats):  # alternate, so drift hits every query alike
        results["agg"] += timed(lambda: query(big, aggregate).fetchall(), 1)
        results["cli"] += timed(cli(aggregate), 1)
        results["cli1"] += timed(cli("select 1"), 1)
        results["files"] += timed(lambda: big.committed_files("rollouts"), 1)
        results["w10"] += timed(arrow_small, 1)
        results["w100"] += timed(arrow_big, 1)
        results["t10"] += timed(lambda: load_rows(small, hi_small - 3, hi_small), 1)
        results["t100"] += timed(lambda: load_rows(big, hi_big - 3, hi_big), 1)
    # measured after the Arrow repeats: the dict path's Python objects would otherwise set the peak
    rss_arrow = peak_rss_gib()
    for _ in range(args.repeats):
        results["d10"] += timed(window(small, hi_small, named_query), 1)
        results["d100"] += timed(window(big, hi_big, named_query), 1)

    repeats = f"{args.repeats} repeat" + ("s" if args.repeats != 1 else "")
    print(f"\n`python bench/sql_scale.py {' '.join(sys.argv[1:])}`: {total:,} rollout rows over {args.versions} "
          f"versions (4 shards each; windows return {4 * rows_per_version:,} rows), {repeats}, "
          f"alternating (the `named_query` rows after the others).")
    print(f"Machine: {machine()}.\n")
    print("| query | median s | min–max s |")
    print("|---|---:|---:|")
    for key, values in results.items():
        print(f"| {names[key]} | {statistics.median(values):.3f} | {min(values):.3f}–{max(values):.3f} |")
    print(f"\nOn disk: {disk_bytes(big.root) / 2**30:.2f} GiB for {args.versions} versions "
          f"({disk_bytes(small.root) / 2**30:.2f} GiB for 10).")
    print(f"Peak RSS: {rss_arrow:.2f} GiB through the aggregate and Arrow windows, {peak_rss_gib():.2f} GiB "
          f"after the `named_query` windows.")


if __name__ == "__main__":
    main()
