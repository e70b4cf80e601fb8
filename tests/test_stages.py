"""verify, score and evaluate on real runs: numbers checked against direct computations, bad input refused."""
from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from roll.metrics import pass_at_k
from roll.policy import load_policy
from roll.sampling import teacher_forced_logprobs
from roll.stages.evaluate import EvaluateConfig, run as evaluate
from roll.stages.generate import GenerateConfig, run as generate
from roll.stages.score import ScoreConfig, run as score
from roll.stages.train import TrainConfig
from roll.stages.verify import VerifyConfig, run as verify
from roll.store import Run, Shard, query, write_table

from conftest import roll_cli, prepare_and_train as train


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_score_equals_direct_teacher_forcing(run_dir, temperature, top_p):
    generate(GenerateConfig(run=run_dir, prompts=5, group_size=3, max_new_tokens=24, temperature=temperature, top_p=top_p))
    verify(VerifyConfig(run=run_dir))
    summary = score(ScoreConfig(run=run_dir, batch_size=4))  # several length-sorted batches
    assert summary["rows"] == 15 and summary["mismatch_max_abs"] < 1e-4
    model, _ = load_policy(Run(run_dir).policy_dir(0))
    cursor = query(Run(run_dir), "select * from samples order by prompt_id, sample_index")
    for row in (dict(zip([d[0] for d in cursor.description], r)) for r in cursor.fetchall()):
        direct = teacher_forced_logprobs(model, row["prompt_token_ids"], row["token_ids"], temperature, top_p)
        ref = teacher_forced_logprobs(model, row["prompt_token_ids"], row["token_ids"], temperature, 1.0)
        assert torch.allclose(torch.tensor(row["trainer_logprobs"]), direct, atol=1e-5)
        assert torch.allclose(torch.tensor(row["ref_logprobs"]), ref, atol=1e-5)  # v0 is π_ref here
        assert row["behaviour_logprob_sum"] == pytest.approx(float(direct.sum()), abs=1e-4)
        assert row["mismatch_max_abs"] < 1e-4 and row["group_size"] == 3
    groups = query(Run(run_dir), "select prompt_id, avg(reward), stddev_pop(reward), any_value(group_reward_mean), "
                                 "any_value(group_reward_std) from samples group by 1").fetchall()
    for _, mean, std, recorded_mean, recorded_std in groups:
        assert recorded_mean == pytest.approx(mean) and recorded_std == pytest.approx(std, abs=1e-12)


def test_verify_marks_arith_answers_and_shards_mirror_rollouts(run_dir):
    generate(GenerateConfig(run=run_dir, prompts=4, group_size=2, max_new_tokens=8, shard=Shard(0, 2)))
    generate(GenerateConfig(run=run_dir, prompts=4, group_size=2, max_new_tokens=8, shard=Shard(1, 2)))
    r = Run(run_dir)
    # replace one completion by a correct solution and one by an empty one: exact verdicts expected
    path = r.shard_path("rollouts", 0, Shard(0, 2))
    rows = pq.read_table(path).to_pylist()
    prompt = {p["prompt_id"]: p for p in r.read_prompts().to_pylist()}
    rows[0]["completion"] = json.loads(prompt[rows[0]["prompt_id"]]["metadata"])["solution"]
    rows[1]["completion"] = ""
    write_table(path, "rollouts", pa.Table.from_pylist(rows, schema=pq.read_schema(path)))
    assert verify(VerifyConfig(run=run_dir, shard=Shard(1, 2)))["shards"] == 1  # an array task takes its own shard
    summary = verify(VerifyConfig(run=run_dir, format_penalty=0.5))
    assert summary["shards"] == 1 and sorted(r.files("verdicts", 0)) == sorted(r.files("rollouts", 0))
    first, second = r.connect().execute("select correct, reward, format_ok, extracted_answer, error from samples "
                                        "where prompt_id = ? order by sample_index", [rows[0]["prompt_id"]]).fetchall()
    assert first == (True, 1.0, True, prompt[rows[0]["prompt_id"]]["answer"], "")
    assert second == (False, -0.5, False, "", "")  # empty completion: wrong, no answer, penalised
    assert verify(VerifyConfig(run=run_dir))["shards"] == 0  # committed: skipped on rerun


def test_evaluate_metrics_match_the_rows(run_dir):
    summary = evaluate(EvaluateConfig(run=run_dir, k=4, limit=10, max_new_tokens=16))
    rows = query(Run(run_dir), "select prompt_id, count(*), sum(correct::int) from evals group by 1").fetchall()
    assert len(rows) == 10 and all(n == 4 for _, n, _ in rows)
    assert summary["pass@1"] == pytest.approx(sum(c / 4 for _, _, c in rows) / 10, abs=1e-4)
    assert summary["pass@4"] == pytest.approx(sum(pass_at_k(4, c, 4) for _, _, c in rows) / 10, abs=1e-4)
    assert summary["dataset"] == "arith" and summary["version"] == 0
    again = evaluate(EvaluateConfig(run=run_dir, k=4, limit=10, max_new_tokens=16))
    assert again["skipped"] and again["pass@1"] == summary["pass@1"]
    out = roll_cli("evaluate", "--run", run_dir, "--k", 2, "--limit", 3, "--max-new-tokens", 8, "--force")
    assert json.loads(out.stdout)["prompts"] == 3
    # GSM8K prompts do not fit the tiny model's 128-token context: one clear line, not an index error
    out = roll_cli("evaluate", "--run", run_dir, "--dataset", "gsm8k", "--limit", 5, check=False)
    assert out.returncode == 2 and "exceeds the model's context of 128 tokens" in out.stderr


def test_bad_input_in_verify_score_and_train(run_dir, tmp_path, tiny_model_dir):
    generate(GenerateConfig(run=run_dir, prompts=3, group_size=2, max_new_tokens=8))
    r = Run(run_dir)
    # a NaN reward in a verdicts file (written by hand, as a custom reward job might): refused by name and row
    verify(VerifyConfig(run=run_dir))
    vpath = r.shard_path("verdicts", 0, Shard(0, 1))
    table = pq.read_table(vpath)
    rewards = table.column("reward").to_pylist()
    rewards[3] = math.nan
    pq.write_table(table.set_column(table.schema.get_field_index("reward"), "reward", pa.array(rewards)), vpath)
    proc = roll_cli("score", "--run", run_dir, check=False)
    assert proc.returncode == 2 and f"{vpath}: row 3 has reward nan" in proc.stderr
    proc = roll_cli("train", "--run", run_dir, check=False)
    assert proc.returncode == 2 and "reward nan" in proc.stderr and not r.policy_dir(1).exists()
    # a prompts table without answers: verify names the file and the column
    vpath.unlink()
    pq.write_table(pq.read_table(r.prompts_path).drop(["answer"]), r.prompts_path)
    proc = roll_cli("verify", "--run", run_dir, check=False)
    assert proc.returncode == 2 and str(r.prompts_path) in proc.stderr and "'answer'" in proc.stderr
    # invalid UTF-8 in a task file
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "1+1", "answer": "2"}\n{"prompt": "\xff\xfe", "answer": "3"}\n')
    proc = roll_cli("init", "--run", tmp_path / "x", "--task", bad, "--model", tiny_model_dir, check=False)
    assert proc.returncode == 2 and "line 2 is not valid UTF-8" in proc.stderr


def test_train_on_the_default_model_reads_lagged_data(run_dir):
    """A short smoke of the whole loop through the stages, reading results back through DuckDB."""
    for version in range(2):
        generate(GenerateConfig(run=run_dir, version=version, prompts=4, group_size=4, max_new_tokens=12))
        train(TrainConfig(run=run_dir, objective="stable-pess", lag=1, mini_batch=16, micro_batch=16))
    assert query(Run(run_dir), "select policy_version, data_version, lag from groups group by all order by 1").fetchall() == [
        (1, 0, 0), (2, 0, 1)]


def test_score_without_ref_then_an_objective_that_reads_ref_rescores(run_dir, capfd):
    from roll.pipeline.prepare import prepare

    generate(GenerateConfig(run=run_dir, prompts=3, group_size=2, max_new_tokens=8))
    verify(VerifyConfig(run=run_dir))
    roll_cli("score", "--run", run_dir, "--no-ref")
    r = Run(run_dir)
    nulls = "select count(*) filter (where ref_logprob_sum is null), count(*) filter (where ref_logprobs is null), count(*) from scores"
    assert query(r, nulls).fetchone() == (6, 6, 6)
    behaviour = query(r, "select behaviour_logprob_sum from scores order by prompt_id, sample_index").fetchall()
    prepare(r, [0], ref=False)  # an objective that does not read π_ref leaves them as they are
    assert query(r, nulls).fetchone() == (6, 6, 6)
    prepare(r, [0], ref=True)  # apo or --kl-ref: re-scored, and said so
    assert "have no π_ref log-probs; re-scoring" in capfd.readouterr().err
    assert query(r, nulls).fetchone() == (0, 0, 6)
    # at version 0 with top-p 1, π_ref is the behaviour checkpoint: its log-probs are the trainer's
    assert query(r, "select count(*) from scores where ref_logprobs <> trainer_logprobs").fetchone() == (0,)
    assert query(r, "select behaviour_logprob_sum from scores order by prompt_id, sample_index").fetchall() == behaviour


def test_keep_loaded_shares_models_but_never_hands_out_trained_weights_under_an_old_version(run_dir):
    """roll iterate keeps models in memory between stages; training changes a model in place, so a later
    load of the version it started from must read that version's own weights again."""
    from roll.policy import keep_loaded

    r = Run(run_dir)
    with keep_loaded():
        first, _ = load_policy(r.policy_dir(0))
        assert load_policy(r.policy_dir(0))[0] is first  # shared while nobody trains it
        generate(GenerateConfig(run=run_dir, prompts=3, group_size=2, max_new_tokens=8))
        verify(VerifyConfig(run=run_dir))
        path = r.shard_path("verdicts", 0, Shard(0, 1))  # the tiny model never answers right: give it a signal
        verdicts = pq.read_table(path)
        rewards = pa.array([float(i % 2) for i in verdicts.column("sample_index").to_pylist()])
        write_table(path, "verdicts", verdicts.set_column(verdicts.schema.get_field_index("reward"), "reward", rewards))
        train(TrainConfig(run=run_dir, objective="pg", mini_batch=6, micro_batch=6, lr=1e-2))
        again, _ = load_policy(r.policy_dir(0))
        trained, _ = load_policy(r.policy_dir(1))
        assert trained is first and again is not first  # train took v0's model and made it v1
    on_disk = {"v0": load_policy(r.policy_dir(0))[0].state_dict(), "v1": load_policy(r.policy_dir(1))[0].state_dict()}
    assert all(torch.equal(again.state_dict()[k], on_disk["v0"][k]) for k in on_disk["v0"])
    assert all(torch.equal(trained.state_dict()[k], on_disk["v1"][k]) for k in on_disk["v1"])
    assert any(not torch.equal(on_disk["v0"][k], on_disk["v1"][k]) for k in on_disk["v0"])
