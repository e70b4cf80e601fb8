"""What `roll init --model DIR` checks before it creates a run (DESIGN §6), on real checkpoints built here and then
broken as a user's download can be: each refusal is one line naming the directory and what is missing, exit
status 2, and no run directory left behind. Also: a task file's prompts go through the chat template, and
`--backend vllm` without vLLM is refused before any work."""
from __future__ import annotations

import json
import shutil

import pytest

from roll.store import Run, query

from conftest import build_chat_checkpoint, roll_cli


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Qwen2 (transformers builds an empty tokenizer for it when the files are gone) and Llama (transformers
    raises instead)."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {arch: build_chat_checkpoint(root / arch, arch) for arch in ("qwen2", "llama")}


def copy_of(checkpoints, arch, tmp_path):
    out = tmp_path / f"{arch}-copy"
    shutil.copytree(checkpoints[arch], out)
    return out


def refused(tmp_path, *args) -> str:
    """`roll init --run tmp_path/run ARGS`: exit 2, exactly one stderr line `roll: error: …` (returned), and
    neither the run nor its staging directory left behind."""
    run = tmp_path / "run"
    proc = roll_cli("init", "--run", run, *args, check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("roll: error: "), proc.stderr
    assert not run.exists() and not list(tmp_path.glob(".run.init-*"))
    return lines[0]


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_a_checkpoint_without_its_tokenizer_is_refused(checkpoints, arch, tmp_path):
    model = copy_of(checkpoints, arch, tmp_path)
    (model / "tokenizer.json").unlink()
    (model / "tokenizer_config.json").unlink()
    line = refused(tmp_path, "--model", model, "--task", "gsm8k")
    assert f"model {model}: no tokenizer" in line and "tokenizer.json" in line, line


def test_a_checkpoint_without_weights_is_refused(checkpoints, tmp_path):
    model = copy_of(checkpoints, "qwen2", tmp_path)
    (model / "model.safetensors").unlink()
    line = refused(tmp_path, "--model", model)
    assert f"model {model}: no weights" in line and "model.safetensors" in line and "pytorch_model.bin" in line, line


def test_a_context_shorter_than_the_task_needs_is_refused(checkpoints, tmp_path):
    """GSM8K's longest prompt is 444 tokens under this tokenizer and chat template, and the task's completion
    length is 512: a 600-token context holds neither that nor the task's default, but holds --max-new-tokens 100."""
    model = copy_of(checkpoints, "qwen2", tmp_path)
    config = json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = 600
    (model / "config.json").write_text(json.dumps(config))
    line = refused(tmp_path, "--model", model, "--task", "gsm8k")
    assert f"model {model}: context too short" in line and "max_position_embeddings is 600 tokens" in line, line
    assert "--max-new-tokens 512" in line, line
    run = tmp_path / "run"
    roll_cli("init", "--run", run, "--model", model, "--task", "gsm8k", "--max-new-tokens", 100)
    from roll.runs import read_run_config

    assert read_run_config(Run(run))["max_new_tokens"] == 100


def test_a_task_file_goes_through_the_chat_template(checkpoints, tmp_path):
    """A user's task file is wrapped in the checkpoint's chat template as the bundled datasets are: the prompt
    generate feeds the model is exactly `apply_chat_template`'s user turn plus the generation prompt (no BOS
    added on top). A row marked as wrapped already is left as it is."""
    from transformers import AutoTokenizer

    model = checkpoints["qwen2"]
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    task = tmp_path / "mytask.jsonl"
    problems = [f"What is {i} + 3?" for i in range(4)]
    wrapped = tokenizer.apply_chat_template([{"role": "user", "content": "What is 9 + 9?"}], tokenize=False,
                                            add_generation_prompt=True)
    task.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p, "answer": str(i + 3)}) + "\n"
                            for i, p in enumerate(problems))
                    + json.dumps({"id": "pre", "prompt": wrapped, "answer": "18", "chat_template": True}) + "\n")
    run = tmp_path / "run"
    roll_cli("init", "--run", run, "--model", model, "--task", task)
    roll_cli("generate", "--run", run, "--prompts", 5, "--group-size", 1, "--max-new-tokens", 2)

    stored = {p["prompt_id"]: p for p in Run(run).read_prompts().to_pylist()}
    fed = dict(query(Run(run), "select prompt_id, prompt_token_ids from rollouts").fetchall())
    assert sorted(fed) == sorted(stored) == ["pre", "q0", "q1", "q2", "q3"]
    for i, problem in enumerate(problems):
        messages = [{"role": "user", "content": problem}]
        assert stored[f"q{i}"]["prompt"] == tokenizer.apply_chat_template(messages, tokenize=False,
                                                                          add_generation_prompt=True)
        assert list(fed[f"q{i}"]) == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False,
                                                                   add_generation_prompt=True)
        assert json.loads(stored[f"q{i}"]["metadata"])["chat_template"] is True
    assert stored["pre"]["prompt"] == wrapped and list(fed["pre"]) == tokenizer(wrapped, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("command", [["iterate", "--iterations", "1"], ["generate"]])
def test_backend_vllm_without_vllm_is_refused_before_any_work(run_dir, monkeypatch, command):
    """With vLLM unimportable (importlib.util.find_spec finds no `vllm`, as where it is not installed), `roll
    iterate --backend vllm` stops in one line before it evaluates v0, and `roll generate` before it loads a model."""
    import importlib.util

    from click.testing import CliRunner

    import roll.stages.generate
    from roll.cli import cli

    def no_sampling(*args, **kwargs):
        raise AssertionError("reached vLLM sampling")

    monkeypatch.setattr(roll.stages.generate, "sample_rollouts_vllm", no_sampling)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "vllm" else find_spec(name, *a, **k))
    result = CliRunner().invoke(cli, [*command, "--run", str(run_dir), "--backend", "vllm"])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and lines == [lines[0]], result.stderr
    assert lines[0].startswith("roll: error: --backend vllm needs vLLM: "), lines
    assert not (run_dir / "evals").exists() and not (run_dir / "rollouts").exists()
