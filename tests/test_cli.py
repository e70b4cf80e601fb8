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
    # a task file's runs complete 512 tokens unless told: the tiny model's 128-token context needs fewer (checked at init)
    one_error_line(roll_cli("init", "--run", tmp_path / "r", "--task", task, "--model", tiny_model_dir, check=False),
                   "context too short", "n_positions is 128 tokens", "--max-new-tokens 512")
    roll_cli("init", "--run", tmp_path / "r", "--task", task, "--model", tiny_model_dir, "--max-new-tokens", 48)
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


def _commands(group, prefix=()):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, prefix + (name,))
        else:
            yield prefix + (name,), command


def test_every_config_field_is_one_option_whose_help_shows_its_default_and_text():
    """Options are generated from the stage configs' fields (roll/options.py): every field with help appears
    in some command, each generated option's default is the field's default, and `roll X --help` shows the
    field's help text and default. No command declares an option twice."""
    import dataclasses
    import re

    import roll.cli as cli_module

    configs = {obj.__name__: obj for obj in vars(cli_module).values()
               if dataclasses.is_dataclass(obj) and isinstance(obj, type)}
    exposed = set()
    runner = CliRunner()
    for path, command in _commands(cli):
        names = [opt for p in command.params for opt in getattr(p, "opts", [])]
        assert len(names) == len(set(names)), (path, sorted(n for n in names if names.count(n) > 1))
        if path[0] not in ("lambert", "sql", "warm"):  # commands over a config: only these options are the CLI's own
            own = {p.opts[0] for p in command.params if isinstance(p, click.Option) and not hasattr(p, "config_field")}
            assert own <= {"--run", "--help", "--nproc", "--out"}, (path, own)
        text = " ".join(runner.invoke(cli, [*path, "--help"], terminal_width=10_000).output.split())
        for param in command.params:
            if not hasattr(param, "config_field"):
                continue
            cls_name, field_name = param.config_field
            exposed.add(param.config_field)
            field = next(f for f in dataclasses.fields(configs[cls_name]) if f.name == field_name)
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            shown = ",".join(map(str, default)) if isinstance(default, tuple) and default and not param.multiple else default
            assert param.default == (() if param.multiple else shown), (path, field_name)
            assert " ".join(field.metadata["help"].split()) in text, (path, field_name)
            if param.show_default and not param.is_flag:
                assert re.search(re.escape(f"[default: {shown}]"), text), (path, field_name, shown)
    for name, cls in configs.items():
        for field in dataclasses.fields(cls):
            if field.metadata.get("help"):
                offered = any((other, field.name) in exposed for other, sub in configs.items() if issubclass(sub, cls))
                assert offered, f"{name}.{field.name} has help but no command offers it"
