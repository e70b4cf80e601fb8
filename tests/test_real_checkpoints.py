"""Real-model behaviour on small checkpoints built here: stops, chat templates, tokenizers without a pad."""
from __future__ import annotations

import json

import pytest

from roll.store import Run, query

from conftest import build_chat_checkpoint, roll_cli


@pytest.fixture(scope="module")
def llama3_style_dir(tmp_path_factory):
    """Shipped as Llama-3-Instruct was: the tokenizer's eos is <|endoftext|>, while the generation config
    stops on [<|im_end|>, <|endoftext|>]; the model ends its turn with <|im_end|>."""
    return build_chat_checkpoint(tmp_path_factory.mktemp("llama3"), "llama", tokenizer_eos="<|endoftext|>",
                                 generation_eos=("<|im_end|>", "<|endoftext|>"), stop_bias=0.6)


def test_generation_stops_at_every_stop_id_of_the_generation_config(llama3_style_dir, tmp_path):
    from transformers import AutoTokenizer

    run = tmp_path / "run"
    roll_cli("init", "--run", run, "--model", llama3_style_dir, "--task", "gsm8k")
    roll_cli("generate", "--run", run, "--prompts", 8, "--group-size", 4, "--max-new-tokens", 32)
    tokenizer = AutoTokenizer.from_pretrained(str(llama3_style_dir))
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    rows = query(Run(run), "select token_ids, finish_reason, stop_token_id, completion from rollouts").fetchall()
    assert len(rows) == 32
    stopped = [r for r in rows if r[1] == "stop"]
    # the model ends its turn with <|im_end|> with p ≈ 0.1 a token (the tokenizer's own eos is <|endoftext|>):
    # a row reaches 32 tokens with p ≈ 0.9^32 ≈ 3 %; before stops honoured the generation config, all 32 did
    assert len(stopped) >= 24 and any(r[2] == im_end for r in stopped)
    assert max(len(r[0]) for r in stopped) > 1  # some rows write text before they stop
    for token_ids, finish, stop, completion in rows:
        ends = [i for i, t in enumerate(token_ids) if t in (im_end, endoftext)]
        if finish == "stop":
            assert ends == [len(token_ids) - 1] and stop == token_ids[-1]  # cut at the first stop token
            assert tokenizer.decode(token_ids[:-1], skip_special_tokens=True) == completion
        else:
            assert ends == [] and stop is None and len(token_ids) == 32
        assert "<|im_start|>" not in completion and "<|im_end|>" not in completion


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    """Qwen2 with grouped-query attention and tied embeddings; eos <|im_end|>, no pad token."""
    return build_chat_checkpoint(tmp_path_factory.mktemp("qwen2"), "qwen2")


@pytest.mark.parametrize("checkpoint", ["llama3_style_dir", "qwen2_dir"])
def test_the_pipeline_runs_on_real_architectures(checkpoint, tmp_path, request):
    run = tmp_path / "run"
    roll_cli("init", "--run", run, "--model", request.getfixturevalue(checkpoint), "--task", "gsm8k")
    roll_cli("generate", "--run", run, "--prompts", 4, "--group-size", 2, "--max-new-tokens", 16)
    assert json.loads(roll_cli("train", "--run", run).stdout)["version"] == 1
    # the sampler's log-probs and the scorer's teacher-forced ones: the same numerics, within float32 rounding
    assert query(Run(run), "select max(mismatch_max_abs) from scores").fetchall()[0][0] < 1e-4
    result = json.loads(roll_cli("evaluate", "--run", run, "--dataset", "gsm8k", "--limit", 4, "--k", 2,
                                 "--max-new-tokens", 16).stdout)
    lengths = query(Run(run), "select max(num_tokens) from evals").fetchall()[0][0]
    assert result["k"] == 2 and lengths <= 16


def test_a_task_records_its_completion_length_and_stages_use_it(qwen2_dir, tmp_path):
    import shutil
    import tomllib

    run = tmp_path / "run"
    roll_cli("init", "--run", run, "--model", qwen2_dir, "--task", "gsm8k")
    config = tomllib.loads((run / "run.toml").read_text())
    assert config["max_new_tokens"] == 512 and config["model"] == str(qwen2_dir.resolve())
    proc = roll_cli("generate", "--run", run, "--prompts", 1, "--group-size", 2)
    assert query(Run(run), "select distinct max_new_tokens from rollouts").fetchall() == [(512,)]
    # a random model rarely stops: the cut share is said in one line
    if query(Run(run), "select count(*) filter (where finish_reason = 'length') from rollouts").fetchall()[0][0] == 2:
        assert "2 of 2 completions (100%) reached --max-new-tokens 512 unfinished" in proc.stderr
    roll_cli("generate", "--run", run, "--version", 0, "--prompts", 1, "--group-size", 2, "--max-new-tokens", 8,
             "--force")  # an explicit option overrides the run's
    assert query(Run(run), "select distinct max_new_tokens from rollouts").fetchall() == [(8,)]
    # MATH's longest prompt is 3,393 tokens under this small tokenizer: init refuses a context without room for it
    # and 1,024 new tokens (tests/test_init_checks.py), so this copy says 8,192 (RoPE: no weight depends on it)
    long_context = tmp_path / "qwen2-8k"
    shutil.copytree(qwen2_dir, long_context)
    config = json.loads((long_context / "config.json").read_text())
    (long_context / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 8192}))
    math = tmp_path / "math"
    roll_cli("init", "--run", math, "--model", long_context, "--task", "math")
    counts = query(Run(math), "select split, count(*) from prompts group by 1 order by 1").fetchall()
    assert counts == [("test", 500), ("train", 7470)]
    assert tomllib.loads((math / "run.toml").read_text())["max_new_tokens"] == 1024


def test_vllm_backend_refusals_and_seeds_need_no_vllm(run_dir):
    """What can be checked without vLLM installed (it cannot be, where the tests run): greedy sampling of
    several completions is refused before vLLM is asked, and every prompt gets its own reproducible seed."""
    from roll.sampling import prompt_seed

    proc = roll_cli("generate", "--run", run_dir, "--backend", "vllm", "--temperature", 0, "--group-size", 4, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("roll: error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "vLLM refuses greedy sampling" in errors[0]
    seeds = [prompt_seed(0, 3, f"p{i}") for i in range(1000)]
    assert len(set(seeds)) == 1000 and seeds == [prompt_seed(0, 3, f"p{i}") for i in range(1000)]
    assert prompt_seed(0, 3, "p0") != prompt_seed(0, 4, "p0") != prompt_seed(1, 3, "p0")


@pytest.fixture(scope="module")
def qwen2_bf16_dir(tmp_path_factory):
    """The Qwen2 checkpoint saved in bfloat16, as Qwen and Llama checkpoints are shipped."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = build_chat_checkpoint(tmp_path_factory.mktemp("qwen2-fp32"), "qwen2")
    out = tmp_path_factory.mktemp("qwen2-bf16")
    AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(out)
    return out


def test_a_bf16_checkpoint_stays_bf16_and_trains_from_float32_master_weights(qwen2_bf16_dir, tmp_path):
    """init keeps the checkpoint's bf16 (it used to re-save float32); every commit stores bf16 weights and the
    float32 masters beside them; two separate one-step updates end where one two-step process ends, which
    they could not if the second resumed from the bf16-rounded weights (the step of lr 1e-4 is far below a
    bf16 weight's rounding step, ~2⁻⁸ relative)."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from roll.runs import read_run_config
    from conftest import fixed_data_run

    run = tmp_path / "run"
    roll_cli("init", "--run", run, "--model", qwen2_bf16_dir, "--task", "gsm8k")
    assert read_run_config(Run(run))["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(Run(run).policy_dir(0) / "model.safetensors").values()} == {torch.bfloat16}
    fixed_data_run(run, prompts=4, group_size=4, max_new_tokens=12)
    continuous = tmp_path / "continuous"
    shutil.copytree(run, continuous)
    step = ["--mini-batch", "1000", "--lr", "1e-4"]
    for version in range(2):
        roll_cli("train", "--run", run, "--version", version, "--lag", version, *step)
    roll_cli("train", "--run", continuous, "--epochs", "2", *step)

    stored = load_file(Run(run).policy_dir(2) / "model.safetensors")
    master = load_file(Run(run).policy_dir(2) / "master.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.bfloat16} and {t.dtype for t in master.values()} == {torch.float32}
    common = stored.keys() & master.keys()  # tied embeddings are stored once, under either name
    assert len(common) >= len(stored) - 1
    assert all(torch.equal(master[k].to(torch.bfloat16), stored[k]) for k in common)  # the weights are the rounded masters
    assert any(not torch.equal(master[k], stored[k].float()) for k in common)  # the masters hold more than bf16 does
    # the same float operations in the same order in both: bitwise up to summation order inside kernels
    reference = load_file(Run(continuous).policy_dir(1) / "master.safetensors")
    assert max((master[k] - reference[k]).abs().max().item() for k in master) < 1e-6
    assert json.loads((Run(run).policy_dir(2) / "policy.json").read_text())["dtype"] == "bfloat16"


def test_dtype_choices_at_init_and_float16_training_is_refused_in_one_line(qwen2_bf16_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    full = tmp_path / "fp32"
    roll_cli("init", "--run", full, "--model", qwen2_bf16_dir, "--task", "gsm8k", "--dtype", "float32")
    assert {t.dtype for t in load_file(Run(full).policy_dir(0) / "model.safetensors").values()} == {torch.float32}
    half = tmp_path / "fp16"
    roll_cli("init", "--run", half, "--model", qwen2_bf16_dir, "--task", "gsm8k", "--dtype", "float16")
    roll_cli("generate", "--run", half, "--prompts", 2, "--group-size", 2, "--max-new-tokens", 8)
    proc = roll_cli("train", "--run", half, check=False)
    assert proc.returncode == 2 and "float16" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert Run(half).policy_versions() == [0]
