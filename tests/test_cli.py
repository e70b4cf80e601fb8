"""The command line: help for every command, the default run, and one clear line for each bad input."""
from __future__ import annotations

import json

import click
import pyarrow.parquet as pq
from click.testing import CliRunner

from roll.cli import cli
from roll.store import Run

from conftest import roll_cli


def test_every_command_has_help_with_an_example():
    runner = CliRunner()
    top = runner.invoke(cli, ["--help"])
    assert top.exit_code == 0
    for name, command in cli.commands.items():
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0 and "Example:" in result.output, name
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"roll {name} {param.opts[0]} has no help text"


def one_error_line(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("roll: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_bad_input_gives_one_clear_line(tmp_path, tiny_model_dir):
    one_error_line(roll_cli("init", "--run", tmp_path / "a", "--task", "nosuchtask", check=False), "unknown task 'nosuchtask'")
    one_error_line(roll_cli("init", "--run", tmp_path / "b", "--model", tmp_path / "missing", check=False),
                   "does not exist", str(tmp_path / "missing"))
    one_error_line(roll_cli("generate", "--run", tmp_path / "c", "--shard", "3/2", check=False), "--shard '3/2'")
    assert not (tmp_path / "c").exists()  # refused before a run was created

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1", "answer": "2"}\n{"prompt": "2+2", "answer": \n')
    one_error_line(roll_cli("init", "--run", tmp_path / "d", "--task", bad, check=False), "bad.jsonl: line 2")
    noanswer = tmp_path / "noanswer.jsonl"
    noanswer.write_text('{"prompt": "1+1", "answer": "2"}\n{"prompt": "2+2"}\n')
    one_error_line(roll_cli("init", "--run", tmp_path / "e", "--task", noanswer, check=False), "line 2 has no 'answer'")
    for name in "abde":
        assert not (tmp_path / name).exists()

    # a run whose prompts file lost a column: generate names the file and the column
    roll_cli("init", "--run", tmp_path / "f", "--model", tiny_model_dir)
    path = Run(tmp_path / "f").prompts_path
    pq.write_table(pq.read_table(path).drop(["answer"]), path)
    one_error_line(roll_cli("generate", "--run", tmp_path / "f", check=False), str(path), "'answer'")
    one_error_line(roll_cli("generate", "--run", tmp_path / "f", "--version", 3, check=False), "policy version 3 does not exist")
    one_error_line(roll_cli("sql", "select nope from rollouts", "--run", tmp_path / "f", check=False), "SQL:")


def test_user_task_file_builds_prompts(tmp_path, tiny_model_dir):
    task = tmp_path / "mytask.jsonl"
    task.write_text("".join(json.dumps({"id": f"q{i}", "problem": f"Q: {i}+1\n", "answer": str(i + 1)}) + "\n"
                            for i in range(5)))
    roll_cli("init", "--run", tmp_path / "r", "--task", task, "--model", tiny_model_dir)
    prompts = Run(tmp_path / "r").read_prompts().to_pylist()
    assert [p["prompt_id"] for p in prompts] == [f"q{i}" for i in range(5)]
    assert {p["split"] for p in prompts} == {"train"} and prompts[3]["answer"] == "4"


def test_default_run_is_created_in_the_working_directory(tmp_path, tiny_model_dir):
    """`roll generate` with no --run creates ./runs/default (here from ROLL_RUN-less cwd) and says so."""
    proc = roll_cli("generate", "--prompts", 2, "--group-size", 2, "--max-new-tokens", 8, cwd=tmp_path,
                    env={"ROLL_RUN": ""})
    assert "created run" in proc.stderr
    assert json.loads(proc.stdout)["rows"] == 4
    assert Run(tmp_path / "runs" / "default").shards("rollouts", 0)
    out = roll_cli("sql", "select policy_version, count(*) as n from rollouts group by 1", "--format", "json", cwd=tmp_path,
                   env={"ROLL_RUN": ""})
    assert json.loads(out.stdout) == [{"policy_version": 0, "n": 4}]
    csv = roll_cli("sql", "select count(*) as n from rollouts", "--format", "csv", "--run", tmp_path / "runs" / "default")
    assert csv.stdout == "n\n4\n"
