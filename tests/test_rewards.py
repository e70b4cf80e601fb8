"""roll verify --reward: users' reward functions in bounded workers, weighed into one reward, on real runs.

The functions are written to files in each test. The tiny random model never answers right, so one completion is
replaced by the prompt's worked solution (as tests/test_stages.py does) to give the `correct` term a 1.
"""
from __future__ import annotations

import json
import textwrap
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from roll.errors import RollError
from roll.rewards import parse_terms, reward_value
from roll.stages.generate import GenerateConfig, run as generate
from roll.stages.verify import VerifyConfig, run as verify
from roll.store import Run, Shard, query, read_table, write_table

from conftest import roll_cli

REWARDS = textwrap.dedent('''
    import math, os, time, types

    def length_mod_3(completion, answer, prompt):  # a number
        return len(completion) % 3

    def as_dict(completion, answer, prompt):  # a dict with "reward" (a bool: 0 or 1)
        return {"reward": prompt["prompt_id"] == BAD, "note": "ignored"}

    def as_verdict(completion, answer, prompt):  # an object with .reward, as roll.verifiers.Verdict
        return types.SimpleNamespace(reward=len(prompt["prompt"]) / 100)

    # each misbehaves on the prompt BAD only, and returns 1 elsewhere
    def sleeps(completion, answer, prompt):
        if prompt["prompt_id"] == BAD:
            time.sleep(30)
        return 1.0

    def raises(completion, answer, prompt):
        if prompt["prompt_id"] == BAD:
            raise ValueError("bad row")
        return 1.0

    def nan(completion, answer, prompt):
        return math.nan if prompt["prompt_id"] == BAD else 1.0

    def dies(completion, answer, prompt):
        if prompt["prompt_id"] == BAD:
            os.kill(os.getpid(), 9)
        return 1.0

    NOT_A_FUNCTION = 3
''')


@pytest.mark.parametrize("returned, expected", [
    (1, [1.0, ""]), (True, [1.0, ""]), (-2.5, [-2.5, ""]), ({"reward": 3, "why": "x"}, [3.0, ""]),
    (SimpleNamespace(reward=0.5), [0.5, ""]),  # as roll.verifiers.Verdict
    ({"score": 1}, [None, "returned a dict without a 'reward' entry (keys: score)"]),
    ("1", [None, "returned str, not a number"]), (None, [None, "returned NoneType, not a number"]),
    ([1.0], [None, "returned list, not a number"]),
    (float("inf"), [None, "returned inf, not a finite number"]), ({"reward": float("nan")}, [None, "returned nan, not a finite number"]),
    (10 ** 400, [None, "returned int that is not a float: int too large to convert to float"]),
])
def test_what_a_reward_function_returns(returned, expected):
    assert reward_value(returned) == expected


def _run_with_one_solution(run_dir, tmp_path):
    """3 prompts × 2 samples, the first row's completion replaced by its solution; the rewards file written with
    BAD = the first prompt. Returns (rewards file, rows of the rollouts, prompts by id)."""
    generate(GenerateConfig(run=run_dir, prompts=3, group_size=2, max_new_tokens=8))
    r = Run(run_dir)
    path = r.shard_path("rollouts", 0, Shard(0, 1))
    rows = pq.read_table(path).to_pylist()
    prompts = {p["prompt_id"]: p for p in r.read_prompts().to_pylist()}
    rows[0]["completion"] = json.loads(prompts[rows[0]["prompt_id"]]["metadata"])["solution"]
    write_table(path, "rollouts", pa.Table.from_pylist(rows, schema=pq.read_schema(path)))
    rewards = tmp_path / "my_rewards.py"
    rewards.write_text(f"BAD = {rows[0]['prompt_id']!r}\n" + REWARDS)
    return rewards, rows, prompts


def _verdicts(run_dir) -> dict:
    table = read_table(Run(run_dir).shard_path("verdicts", 0, Shard(0, 1)), "verdicts")
    return {(v["prompt_id"], v["sample_index"]): v for v in table.to_pylist()}


def test_composite_reward_is_the_weighted_sum_of_its_terms(run_dir, tmp_path):
    rewards, rows, prompts = _run_with_one_solution(run_dir, tmp_path)
    roll_cli("verify", "--run", run_dir, "--format-penalty", 0.5, "--reward", "correct",
             "--reward", f"{rewards}:length_mod_3", "--reward", f"{rewards}:as_dict", "--reward", f"{rewards}:as_verdict",
             "--reward-weight", 1, "--reward-weight", 0.25, "--reward-weight", -2, "--reward-weight", 3)
    verdicts = _verdicts(run_dir)
    assert len(verdicts) == 6
    for row in rows:
        verdict, prompt = verdicts[row["prompt_id"], row["sample_index"]], prompts[row["prompt_id"]]
        correct = 1.0 if verdict["correct"] else (0.0 if verdict["format_ok"] else -0.5)
        values = [correct, len(row["completion"]) % 3, float(row["prompt_id"] == rows[0]["prompt_id"]),
                  len(prompt["prompt"]) / 100]
        assert verdict["reward"] == pytest.approx(1 * values[0] + 0.25 * values[1] - 2 * values[2] + 3 * values[3])
        assert json.loads(verdict["reward_terms"]) == [
            {"reward": spec, "weight": weight, "value": pytest.approx(value)}
            for spec, weight, value in zip(["correct", f"{rewards}:length_mod_3", f"{rewards}:as_dict",
                                            f"{rewards}:as_verdict"], [1.0, 0.25, -2.0, 3.0], values)]
        assert verdict["error"] == ""
    assert verdicts[rows[0]["prompt_id"], rows[0]["sample_index"]]["correct"]  # the solution: the correct term is 1
    assert sum(v["correct"] for v in verdicts.values()) == 1
    # SQL users read the terms with DuckDB's JSON functions (docs/design.md)
    terms = query(Run(run_dir), "select sum(json_extract(reward_terms, '$[1].value')::double) from verdicts").fetchone()
    assert terms == (pytest.approx(sum(len(row["completion"]) % 3 for row in rows)),)


def test_reward_functions_that_hang_raise_return_nan_or_die_are_errors_and_the_stage_finishes(run_dir, tmp_path):
    rewards, rows, _ = _run_with_one_solution(run_dir, tmp_path)
    bad = ("sleeps", "raises", "nan", "dies")
    args = [a for name in bad for a in ("--reward", f"{rewards}:{name}")]
    proc = roll_cli("verify", "--run", run_dir, "--timeout", 1, "--workers", 1, "--reward", "correct", *args,
                    "--reward-weight", 1, *[a for _ in bad for a in ("--reward-weight", 0.5)])
    summary = json.loads(proc.stdout)
    assert (summary["rows"], summary["reward_errors"]) == (6, 2)  # the stage finished: every row committed
    expected_errors = {"sleeps": "timeout after 1 s", "raises": "ValueError: bad row",
                       "nan": "returned nan, not a finite number", "dies": "worker died (exit code -9)"}
    for (prompt_id, _), verdict in _verdicts(run_dir).items():
        terms = json.loads(verdict["reward_terms"])
        correct = 1.0 if verdict["correct"] else 0.0
        if prompt_id == rows[0]["prompt_id"]:  # every user term failed: 0 each, and each error recorded
            assert verdict["reward"] == correct
            assert [(t["value"], t["error"]) for t in terms[1:]] == [(0.0, expected_errors[name]) for name in bad]
            assert verdict["error"] == "; ".join(f"{rewards}:{name}: {expected_errors[name]}" for name in bad)
        else:  # the replaced workers went on with the other rows
            assert verdict["reward"] == correct + 4 * 0.5 and verdict["error"] == ""
            assert [t["value"] for t in terms[1:]] == [1.0] * 4 and not any("error" in t for t in terms)


def test_bad_reward_options_are_one_line_before_anything_is_committed(run_dir, tmp_path):
    generate(GenerateConfig(run=run_dir, prompts=2, group_size=2, max_new_tokens=8))
    (tmp_path / "boom.py").write_text("raise RuntimeError('no GPU here')\n")
    (tmp_path / "ok.py").write_text(REWARDS.replace("BAD", "'x'"))
    for specs, weights, message in [
        (("",), None, "--reward '' is empty"),
        (("correct", "correct"), None, "--reward correct is given twice"),
        (("correct",), (1.0, 2.0), "--reward given 1 time(s) but --reward-weight 2 time(s)"),
        (None, (1.0,), "--reward-weight given 1 time(s) but no --reward"),
        (("correct",), (float("inf"),), "--reward-weight inf: must be"),
        (("nofunction",), None, "--reward nofunction: write correct"),
        ((f"{tmp_path}/missing.py:f",), None, "no file"),
        ((f"{tmp_path}/ok.py:absent",), None, "has no function 'absent'"),
        ((f"{tmp_path}/ok.py:NOT_A_FUNCTION",), None, "'NOT_A_FUNCTION' in"),
        ((f"{tmp_path}/boom.py:f",), None, "cannot import"),
        (("roll_no_such_module:f",), None, "cannot import roll_no_such_module: ModuleNotFoundError"),
    ]:
        with pytest.raises(RollError, match=message.replace("(", r"\(").replace(")", r"\)")):
            verify(VerifyConfig(run=run_dir, reward=specs, reward_weight=weights))
    assert Run(run_dir).files("verdicts", 0) == {}
    # on the command line: exit 2 and one line naming the spec
    proc = roll_cli("verify", "--run", run_dir, "--reward", f"{tmp_path}/boom.py:f", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert f"--reward {tmp_path}/boom.py:f: cannot import" in proc.stderr and "RuntimeError: no GPU here" in proc.stderr
    proc = roll_cli("verify", "--run", run_dir, "--reward-weight", "nan", "--reward", "correct", check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == "roll: error: --reward-weight nan: must be a number"
    assert Run(run_dir).files("verdicts", 0) == {}
    assert parse_terms(None, None)[0][0].spec == "correct"


def test_verdicts_without_reward_terms_stay_readable(run_dir):
    """A verdicts file written before the column existed: the stages read NULL terms, as `roll sql` shows."""
    generate(GenerateConfig(run=run_dir, prompts=2, group_size=2, max_new_tokens=8))
    summary = verify(VerifyConfig(run=run_dir))
    assert summary["reward_errors"] == 0
    path = Run(run_dir).shard_path("verdicts", 0, Shard(0, 1))
    table = pq.read_table(path)
    assert {tuple(json.loads(t)[0].items()) for t in table.column("reward_terms").to_pylist()} <= {
        (("reward", "correct"), ("weight", 1.0), ("value", 0.0)), (("reward", "correct"), ("weight", 1.0), ("value", 1.0))}
    rewards = table.column("reward").to_pylist()
    old = table.drop(["reward_terms"])
    pq.write_table(old.replace_schema_metadata(table.schema.metadata), path)  # keeps the place record
    assert read_table(path, "verdicts").column("reward_terms").to_pylist() == [None] * 4
    assert sorted(query(Run(run_dir), "select reward, reward_terms from verdicts").fetchall()) == sorted(
        (r, None) for r in rewards)
    # roll sql's table shows a term's error as written: "my.py:boom: …" is no emoji code, "[/b]" no markup
    out = roll_cli("sql", "--run", run_dir, "select 'my.py:boom: [/b]' as error")
    assert "my.py:boom: [/b]" in out.stdout
