"""Metrics sinks (roll/sinks.py): the curves `roll iterate --log-to` draws in TensorBoard and wandb, read back with
their own readers, equal the run's tables; `roll report --to` rebuilds the same curves from the tables alone; a
missing package is one line."""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from roll.store import Run, rows, write_table

from conftest import roll_cli

if os.environ.get("CI"):
    import tensorboard  # noqa: F401  under CI a missing tensorboard fails the run: the check may not vanish
else:
    pytest.importorskip("tensorboard")

# one update of one optimiser step, and evaluations of v0 and v1 on 4 prompts × 2 samples, at the smallest scale
# that still trains on whole groups; then `roll train` makes v2 (the cheapest way to test both commands' paths)
ITERATE = ["iterate", "--iterations", 1, "--prompts", 4, "--group-size", 2, "--max-new-tokens", 8, "--eval-every", 1,
           "--eval-k", 2, "--eval-limit", 4]


def wandb_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("wandb") is not None


@pytest.fixture(scope="module")
def logged(tmp_path_factory, tiny_model_dir) -> Run:
    """One short `roll iterate --log-to tensorboard[,wandb]` (wandb where it is installed) making v1, then `roll
    generate` of v1 and `roll train --log-to tensorboard` making v2 into the same TensorBoard directory."""
    path = tmp_path_factory.mktemp("sinks") / "run"
    roll_cli("init", "--run", path, "--model", tiny_model_dir)
    sinks = "tensorboard,wandb" if wandb_installed() else "tensorboard"
    roll_cli(*ITERATE, "--run", path, "--log-to", sinks)
    roll_cli("generate", "--run", path, "--version", 1, "--prompts", 4, "--group-size", 2, "--max-new-tokens", 8)
    roll_cli("train", "--run", path, "--log-to", "tensorboard")
    return Run(path)


def event_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under `directory`, read by tensorboard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def expected_train(run: Run) -> dict[str, list[tuple[int, float]]]:
    """Every numeric `steps` column but the keys, as (global_step + 1, value) per row, from DuckDB."""
    steps = rows(run, "SELECT * FROM steps ORDER BY global_step")
    assert steps, "the run has no steps"
    columns = [c for c, v in steps[0].items()
               if isinstance(v, (int, float)) and c not in ("policy_version", "step", "global_step")]
    return {f"train/{c}": [(r["global_step"] + 1, r[c]) for r in steps] for c in columns}


def expected_evals(run: Run) -> dict[str, list[tuple[int, float]]]:
    """pass@1 and pass@2 per evaluated version, from DuckDB: the mean over prompts of c/n and of the unbiased
    pass@2 = 1 − C(n−c, 2)/C(n, 2), which with n = 2 samples is 1 if either is correct; x = the optimiser steps
    behind the version."""
    per_version = rows(run, """
        WITH p AS (SELECT policy_version, dataset, prompt_id, count(*) AS n, sum(correct::INTEGER) AS c
                   FROM evals GROUP BY ALL)
        SELECT policy_version, dataset, avg(c / n) AS pass1, avg(CASE WHEN c > 0 THEN 1.0 ELSE 0.0 END) AS pass2,
               max(n) AS n, (SELECT count(*) FROM steps s WHERE s.policy_version <= p.policy_version) AS x
        FROM p GROUP BY policy_version, dataset ORDER BY policy_version""")
    assert per_version and all(r["n"] == 2 for r in per_version)
    out = {}
    for r in per_version:
        out.setdefault(f"eval/{r['dataset']}/pass@1", []).append((r["x"], r["pass1"]))
        out.setdefault(f"eval/{r['dataset']}/pass@2", []).append((r["x"], r["pass2"]))
    return out


def assert_float32_equal(got: dict, expected: dict) -> None:
    """TensorBoard stores a scalar as a float32 (simple_value): each value read back is the table's float64 rounded
    to float32 once, so equality is exact after that rounding (a relative error below 2^-24), NaN as NaN."""
    assert sorted(got) == sorted(expected)
    for tag, points in expected.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag  # one point per row, none twice
        for (_, value), (_, want) in zip(got[tag], points):
            rounded = float(np.float32(want))
            assert value == rounded or (math.isnan(value) and math.isnan(want)), (tag, value, want)


def test_the_sinks_hold_every_step_and_evaluation_and_report_rebuilds_them_from_the_tables(logged, tmp_path):
    """One test over the one logged run (module fixtures are made once per xdist worker, so three tests of it cost
    up to two runs): TensorBoard, wandb's offline run, then `roll report --to tensorboard` on a copy."""
    check_tensorboard(logged)
    check_wandb(logged)
    check_report(logged, tmp_path)


def check_tensorboard(logged):
    """iterate's update (x = 1) and evaluations (v0 at x = 0, v1 at x = 1), then train's update (x = 2), each
    once: every curve point equals its row in the tables."""
    got = event_scalars(logged.sink_dir("tensorboard"))
    expected = {**expected_train(logged), **expected_evals(logged)}
    assert_float32_equal(got, expected)
    assert len(got["train/loss"]) == rows(logged, "SELECT count(*) AS n FROM steps")[0]["n"] == 2
    assert [s for s, _ in got["train/loss"]] == [1, 2] and [s for s, _ in got["eval/arith/pass@1"]] == [0, 1]


def wandb_history(directory) -> list[dict]:
    """The history rows of the one offline run under `directory`, from its .wandb file: wandb's LevelDB-style log
    (a 7-byte header, then 32 KiB blocks of records: checksum u32, length u16, type u8 = full/first/middle/last)
    of protobuf `Record`s. wandb ≥ 0.2x has no Python reader for it any more; this is that format, read plainly."""
    from wandb.proto import wandb_internal_pb2

    (path,) = directory.glob("wandb/offline-run-*/run-*.wandb")
    data, out, pos, pending = path.read_bytes(), [], 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a record header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                # a key with "/" arrives split into nested_key
                out.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return out


def check_wandb(logged):
    if not wandb_installed() and not os.environ.get("CI"):  # in the dev extra: under CI it must be there
        return
    history = wandb_history(logged.sink_dir("wandb"))
    # iterate's points (x <= 1); `roll train` logged to tensorboard alone
    expected = {tag: [p for p in points if p[0] <= 1]
                for tag, points in {**expected_train(logged), **expected_evals(logged)}.items()}
    # wandb keeps the float64: every value equals the table's exactly
    got = {tag: [(h["_step"], h[tag]) for h in history if tag in h] for tag in expected}
    assert got == expected


def check_report(logged, tmp_path):
    """A copy of the run without logs/, its evaluations rewritten so sample 0 of each prompt is right and sample 1
    wrong: pass@1 = 1/2 and pass@2 = 1 at every evaluation (by hand). `roll report --to tensorboard` draws them and
    every step from the tables alone; a second replay replaces the first rather than adding its points again."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from roll.sinks import replay

    copy = Run(shutil.copytree(logged.root, tmp_path / "copy", ignore=shutil.ignore_patterns("logs")))
    for path in copy.committed_files("evals"):
        table = pq.read_table(path)
        table = table.set_column(table.schema.get_field_index("correct"), "correct",
                                 pc.equal(table.column("sample_index"), 0))
        write_table(path, "evals", table)
    summary = json.loads(roll_cli("report", "--to", "tensorboard", copy.root).stdout)
    replay(copy, ["tensorboard"])  # the same function again, in this process
    got = event_scalars(copy.sink_dir("tensorboard"))
    expected = {**expected_train(copy), **expected_evals(copy)}
    assert expected["eval/arith/pass@1"] == [(0, 0.5), (1, 0.5)]
    assert expected["eval/arith/pass@2"] == [(0, 1.0), (1, 1.0)]
    assert_float32_equal(got, expected)
    assert expected_train(copy) == expected_train(logged)  # the same steps as the live run drew
    assert summary["sinks"][0]["points"] == sum(map(len, expected.values()))


def test_a_missing_sink_package_is_one_line_naming_the_extra(run_dir):
    """The package made unimportable in the command's own process (sys.modules[name] = None is how Python marks a
    module that must not import): one line, exit 2, before any work — the run is left as it was."""
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    program = ("import sys; sys.modules['wandb'] = None; sys.argv = ['roll', *sys.argv[1:]]; "
               "from roll.cli import main; main()")
    for args, line in [(["train", "--run", run_dir, "--log-to", "tensorboard,wandb"],
                        "roll: error: --log-to wandb needs the wandb package: pip install 'roll[wandb]'"),
                       (["report", "--to", "wandb", run_dir],
                        "roll: error: --to wandb needs the wandb package: pip install 'roll[wandb]'"),
                       (["iterate", "--run", run_dir, "--log-to", "mlflow"],
                        "roll: error: --log-to mlflow: choose from tensorboard, wandb, trackio")]:
        proc = subprocess.run([sys.executable, "-c", program, *map(str, args)], capture_output=True, text=True,
                              timeout=120, env={**os.environ, "ROLL_WARM": ""})
        assert (proc.returncode, proc.stderr, proc.stdout) == (2, line + "\n", ""), args
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before
