"""generate: row counts, reproducibility, shard partitions, and log-probs of the distribution sampled."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from roll.errors import RollError
from roll.policy import load_policy
from roll.sampling import sampling_logprobs, teacher_forced_logprobs
from roll.stages.generate import GenerateConfig, run, version_prompt_ids
from roll.store import Run, Shard, query

from conftest import build_chat_checkpoint, roll_cli, kill_once_progress_is_drawn

SMALL = dict(prompts=6, group_size=4, max_new_tokens=24)


def test_rows_are_prompts_times_group(run_dir):
    summary = run(GenerateConfig(run=run_dir, **SMALL))
    assert summary["rows"] == 24 and not summary["skipped"]
    r = Run(run_dir)
    assert list(r.shards("rollouts", 0)) == [Shard(0, 1)]
    assert query(r, "select count(*), count(distinct prompt_id), min(sample_index), max(sample_index), "
                    "bool_and(num_tokens = len(token_ids) and num_tokens = len(behaviour_logprobs)), "
                    "bool_and(finish_reason in ('stop', 'length')) from rollouts").fetchall() == [(24, 6, 0, 3, True, True)]
    # a committed shard is skipped on rerun, and --force rewrites it with the same tokens
    assert run(GenerateConfig(run=run_dir, **SMALL))["skipped"]
    before = query(r, "select prompt_id, sample_index, token_ids from rollouts order by 1, 2").fetchall()
    run(GenerateConfig(run=run_dir, force=True, **SMALL))
    assert query(r, "select prompt_id, sample_index, token_ids from rollouts order by 1, 2").fetchall() == before


def test_force_twice_gives_identical_token_ids_from_the_cli(run_dir):
    args = ["generate", "--run", run_dir, "--prompts", 4, "--group-size", 4, "--max-new-tokens", 16, "--force"]
    tokens = []
    for _ in range(2):
        roll_cli(*args)
        tokens.append(query(Run(run_dir), "select prompt_id, sample_index, token_ids from rollouts order by 1, 2").fetchall())
    assert tokens[0] == tokens[1] and len(tokens[0]) == 16


def test_two_concurrent_shard_processes_cover_every_prompt_once(run_dir):
    args = ["generate", "--run", run_dir, "--prompts", 10, "--group-size", 3, "--max-new-tokens", 16]
    procs = [subprocess.Popen([sys.executable, "-m", "roll", *map(str, args), "--shard", f"{i}/2"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()
    r = Run(run_dir)
    assert sorted(r.shards("rollouts", 0)) == [Shard(0, 2), Shard(1, 2)]
    per_prompt = query(r, "select prompt_id, count(*) from rollouts group by 1").fetchall()
    expected = version_prompt_ids([f"arith-train-{i:05d}" for i in range(5000)], 0, 10, 0)
    assert sorted(p for p, _ in per_prompt) == sorted(expected)
    assert all(n == 3 for _, n in per_prompt)
    # and a single process with a different shard count is refused, not mixed in
    with pytest.raises(RollError, match="already has rollouts in 2 shards"):
        run(GenerateConfig(run=run_dir, prompts=10, group_size=3, max_new_tokens=16))


def test_versions_walk_through_the_train_split():
    ids = [f"p{i}" for i in range(10)]
    first_epoch = [pid for v in range(5) for pid in version_prompt_ids(ids, v, 2, seed=3)]
    assert sorted(first_epoch) == sorted(ids)  # five versions of two prompts: each prompt once
    assert version_prompt_ids(ids, 5, 2, seed=3) != version_prompt_ids(ids, 0, 2, seed=3)  # new epoch, new order
    assert version_prompt_ids(ids, 1, 2, seed=3) == version_prompt_ids(ids, 1, 2, seed=3)
    with pytest.raises(RollError, match="only 10 train prompts"):
        version_prompt_ids(ids, 0, 11, seed=0)


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (1.0, 1.0), (0.7, 0.9)])
def test_behaviour_logprobs_equal_teacher_forced(run_dir, temperature, top_p):
    """The sampler's incremental, left-padded, KV-cached log-probs equal one full forward pass per row."""
    run(GenerateConfig(run=run_dir, prompts=6, group_size=4, max_new_tokens=32, temperature=temperature, top_p=top_p))
    model, _ = load_policy(Run(run_dir).policy_dir(0))
    rows = Run(run_dir).read_version("rollouts", 0).to_pylist()
    worst = 0.0
    for row in rows:
        expected = teacher_forced_logprobs(model, row["prompt_token_ids"], row["token_ids"], temperature, top_p)
        worst = max(worst, (expected - torch.tensor(row["behaviour_logprobs"])).abs().max().item())
    assert worst < 1e-4
    if temperature == 0:  # greedy: every row of a prompt is the same argmax path
        by_prompt = {}
        for row in rows:
            by_prompt.setdefault(row["prompt_id"], set()).add(tuple(row["token_ids"]))
        assert all(len(paths) == 1 for paths in by_prompt.values())


def test_top_p_keeps_the_smallest_nucleus_and_renormalises():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    lp = sampling_logprobs(probs.log(), temperature=1.0, top_p=0.75)
    # 0.5 alone is below 0.75; 0.5 + 0.3 reaches it: keep the first two, renormalised to 0.625 / 0.375
    assert torch.allclose(lp.exp(), torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=1e-6)
    t = sampling_logprobs(probs.log(), temperature=0.5, top_p=1.0).exp()
    assert torch.allclose(t, probs ** 2 / (probs ** 2).sum(), atol=1e-6)  # T = 0.5 squares the probabilities


def test_generate_killed_mid_run_then_rerun_completes(run_dir, tmp_path):
    args = [sys.executable, "-m", "roll", "generate", "--run", str(run_dir), "--prompts", 8,
            "--group-size", 8, "--max-new-tokens", 48, "--batch-size", 8]
    reference = tmp_path / "reference"
    shutil.copytree(run_dir, reference)
    # killed once the progress bar is drawn, i.e. while the first of 8 batches (one prompt's 8 samples) samples
    kill_once_progress_is_drawn(args, "generate v0")
    r = Run(run_dir)
    directory = r.version_dir("rollouts", 0)
    assert not directory.exists() or list(directory.iterdir()) == []  # no shard, no temporary
    assert query(r, "select count(*) from rollouts").fetchall() == [(0,)]
    roll_cli(*args[3:])
    roll_cli(*[a if a != str(run_dir) else str(reference) for a in args[3:]])  # uninterrupted
    assert query(r, "select count(*), count(distinct prompt_id) from rollouts").fetchall() == [(64, 8)]
    assert [p.name for p in directory.iterdir()] == ["part-00000-of-00001.parquet"]
    same = "select prompt_id, sample_index, token_ids from rollouts order by 1, 2"
    assert query(r, same).fetchall() == query(Run(reference), same).fetchall()


def test_load_policy_fuses_tanh_gelu_without_changing_the_function(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    from transformers.activations import NewGELUActivation

    from roll.policy import load_policy

    plain = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    fused, _ = load_policy(tiny_model_dir)
    assert any(isinstance(m, NewGELUActivation) for m in plain.modules())
    assert not any(isinstance(m, NewGELUActivation) for m in fused.modules())
    ids = torch.randint(0, plain.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gap = (plain(ids).logits - fused(ids).logits).abs().max().item()
    assert gap < 1e-4  # a different kernel for the same function


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8)])
def test_chunked_head_gives_the_whole_heads_logprobs_entropy_and_gradients(tiny_model_dir, temperature, top_p,
                                                                           monkeypatch):
    """The head run over chunks of positions (checkpointed under autograd) computes the same function as the
    head over all positions at once: only the matmul's blocking differs, i.e. float32 rounding (~1e-7
    relative) of log-probs whose size is ≲ 10, so 1e-5 holds with margin; gradients likewise, relative."""
    import roll.sampling as sampling
    from roll.sampling import completion_logprobs

    model, _ = load_policy(tiny_model_dir)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 40, (n,), generator=generator).tolist() for n in (5, 9, 7)]
    completions = [torch.randint(5, 40, (n,), generator=generator).tolist() for n in (12, 3, 20)]
    whole = completion_logprobs(model, prompts, completions, temperature, top_p, with_entropy=True, chunked=False)
    monkeypatch.setattr(sampling, "HEAD_CHUNK_ELEMENTS", 3 * model.config.vocab_size * 4)  # chunks of 4 positions
    parts = completion_logprobs(model, prompts, completions, temperature, top_p, with_entropy=True, chunked=True)
    assert torch.equal(whole[1], parts[1])
    outside = torch.isinf(whole[0])  # tokens outside the top-p nucleus: −inf in both
    assert torch.equal(outside, torch.isinf(parts[0]))
    assert (whole[0] - parts[0])[~outside].abs().max().item() < 1e-5 and (whole[2] - parts[2]).abs().max().item() < 1e-5
    if top_p < 1.0:
        return  # a −inf log-prob has no gradient to compare
    model.train()
    grads = []
    for chunked in (False, True):
        model.zero_grad()
        completion_logprobs(model, prompts, completions, temperature, top_p, chunked=chunked)[0].sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert (grads[0] - grads[1]).abs().max().item() <= 1e-5 * grads[0].abs().max().item()


def test_row_uniforms_depend_on_the_row_seed_and_step_only():
    """A row's random numbers are a function of (seed, step): the same whichever rows stand beside it or in
    what order, different across seeds and steps, and in (0, 1)."""
    from roll.sampling import group_seeds, row_uniforms

    seeds = torch.tensor(group_seeds(0, 3, [f"p{i}" for i in range(50)], 8))
    alone = torch.stack([row_uniforms(seeds[i:i + 1], 5)[0] for i in range(len(seeds))])
    order = torch.randperm(len(seeds), generator=torch.Generator().manual_seed(0))
    assert torch.equal(row_uniforms(seeds, 5), alone)
    assert torch.equal(row_uniforms(seeds[order], 5), alone[order])
    assert len(set(row_uniforms(seeds, 5).tolist())) == len(seeds)  # 400 rows, 2³² values: a tie has p < 2e-5
    assert not torch.equal(row_uniforms(seeds, 5), row_uniforms(seeds, 6))
    everything = torch.cat([row_uniforms(seeds, t) for t in range(20)])
    assert 0 < everything.min() and everything.max() < 1


def test_on_device_draws_follow_the_sampling_distribution():
    """Counts of 20,000 draws (one row each, consecutive seeds) from a fixed distribution pass a chi-square test
    at significance 1e-6: 6 categories, χ² critical value 35.9 for 5 degrees of freedom. The seeds are fixed,
    so the outcome is too; the bound says such a sample is not a freak of a biased sampler. A token outside the
    top-p nucleus (probability 0) is never drawn."""
    from roll.sampling import draw_tokens, row_uniforms, sampling_logprobs

    probs = torch.tensor([0.05, 0.1, 0.15, 0.2, 0.22, 0.28])
    n = 20_000
    logits = probs.log().repeat(n, 1)
    seeds = torch.arange(n, dtype=torch.long) + 12345
    counts = torch.bincount(draw_tokens(sampling_logprobs(logits, 1.0, 1.0), row_uniforms(seeds, 0)), minlength=6)
    expected = probs * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 35.9, (counts.tolist(), chi2)
    nucleus = draw_tokens(sampling_logprobs(logits, 1.0, 0.5), row_uniforms(seeds, 1))  # keeps 0.28, 0.22
    assert set(nucleus.tolist()) == {4, 5}


def test_same_seed_same_tokens_and_a_row_does_not_depend_on_its_shard(run_dir):
    """On one device the same command gives the same tokens; a prompt's rows drawn in shard 1/2 are the ones
    the single shard drew for it when the batches compute the same logits (here: one prompt per batch)."""
    from roll.stages.generate import GenerateConfig, run as generate
    from roll.store import Run, Shard, query

    tokens = "select prompt_id, sample_index, token_ids from rollouts"
    common = dict(prompts=4, group_size=3, max_new_tokens=12, batch_size=3)  # one prompt (3 rows) per batch
    generate(GenerateConfig(run=run_dir, **common))
    whole = {(pid, j): t for pid, j, t in query(Run(run_dir), tokens).fetchall()}
    generate(GenerateConfig(run=run_dir, **common, force=True, shard=Shard(1, 2)))
    generate(GenerateConfig(run=run_dir, **common, force=True, shard=Shard(0, 2)))
    halves = {(pid, j): t for pid, j, t in query(Run(run_dir), tokens).fetchall()}
    assert halves == whole and len(whole) == 12
    assert len({tuple(t) for t in whole.values()}) > 1


def test_a_bf16_run_reproduces_its_rows_for_the_same_command(tmp_path):
    """The promise for bfloat16 checkpoints (README, Reproducibility): the same command, in another process, draws
    the same rows. Not promised: the same rows under another --shard or --batch-size, since bf16 logits depend
    on the batch's shape through the kernels' rounding and a token flips wherever a random number falls that
    close to a boundary (issue 21 measured 3/16 to 17/32 rows identical across such changes)."""
    run, again = tmp_path / "run", tmp_path / "again"
    roll_cli("init", "--run", run, "--dtype", "bfloat16")
    shutil.copytree(run, again)
    options = ("--prompts", 4, "--group-size", 4, "--max-new-tokens", 24, "--batch-size", 8)
    for target in (run, again):
        roll_cli("generate", "--run", target, *options)
    tokens = "select prompt_id, sample_index, token_ids, behaviour_logprobs from rollouts order by 1, 2"
    assert query(Run(run), tokens).fetchall() == query(Run(again), tokens).fetchall()
    assert len(query(Run(run), tokens).fetchall()) == 16


def test_backend_auto_samples_with_roll_on_the_cpu_and_vllm_arg_needs_a_vllm_backend(run_dir):
    """auto picks vLLM on a CUDA device, or on the CPU for a model of 10 M parameters or more (BENCHMARKS.md);
    the 1.8 M default on this CPU gets roll's sampler, the same rows as --backend hf. --vllm-arg is accepted with
    auto (it applies when vLLM is chosen), refused with hf."""
    if torch.cuda.is_available():
        pytest.skip("auto picks vLLM on a CUDA device")
    summary = run(GenerateConfig(run=run_dir, backend="auto", vllm_args=("enforce_eager=true",), **SMALL))
    assert summary["backend"] == "hf" and summary["rows"] == 24
    r = Run(run_dir)
    auto_rows = query(r, "select prompt_id, sample_index, token_ids, backend from rollouts order by 1, 2").fetchall()
    assert {row[3] for row in auto_rows} == {"hf"}
    run(GenerateConfig(run=run_dir, backend="hf", force=True, **SMALL))
    assert query(r, "select prompt_id, sample_index, token_ids, backend from rollouts order by 1, 2").fetchall() == auto_rows
    with pytest.raises(RollError, match="--vllm-arg enforce_eager=true: only with --backend vllm or auto"):
        run(GenerateConfig(run=run_dir, backend="hf", vllm_args=("enforce_eager=true",), **SMALL))


def test_backend_auto_takes_vllm_on_the_cpu_from_ten_million_parameters_where_it_is_installed(tmp_path):
    """The crossover read from the checkpoint's safetensors header, no weights loaded: a 2-layer Qwen2 of
    d = 768 (over 10 M parameters) gets vLLM where vLLM is installed (the README's test environment), hf where
    it is not."""
    import importlib.util

    from roll.memory import checkpoint_shape
    from roll.stages.generate import AUTO_VLLM_CPU_PARAMETERS, chosen_backend

    if torch.cuda.is_available():
        pytest.skip("auto picks vLLM on a CUDA device whatever the size")
    big = build_chat_checkpoint(tmp_path / "qwen2", hidden_size=768)
    small = build_chat_checkpoint(tmp_path / "small")
    assert checkpoint_shape(big).parameters >= AUTO_VLLM_CPU_PARAMETERS > checkpoint_shape(small).parameters
    installed = importlib.util.find_spec("vllm") is not None
    assert chosen_backend("auto", "cpu", big) == ("vllm" if installed else "hf")
    assert chosen_backend("auto", "cpu", small) == "hf"
    assert chosen_backend("hf", "cpu", big) == "hf" and chosen_backend("vllm", "cpu", small) == "vllm"
