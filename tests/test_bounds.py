"""Bounded inputs: every numeric option of every command declares a range, values outside it (and NaN,
infinities, non-numbers) are one line and exit 2 before any work, and the product of options that decides
memory is checked against what the machine has (roll.memory)."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import click
import pytest
from click.testing import CliRunner

from roll.cli import cli
from roll.options import Bounded, CommaList, VersionRange

EDGES = ("0", "-1", "1", str(2 ** 64), "nan", "inf")


def commands(group=cli, prefix=()):
    """(argv prefix, command) for every command, inside groups too (slurm render)."""
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from commands(command, (*prefix, name))
        else:
            yield (*prefix, name), command


def numeric_options(command) -> list[click.Option]:
    def numeric(kind):
        return (isinstance(kind, (Bounded, VersionRange)) or (isinstance(kind, CommaList) and kind.item is not str)
                or isinstance(kind, (click.types.IntParamType, click.types.FloatParamType)))
    return [p for p in command.params if isinstance(p, click.Option) and numeric(p.type)]


def test_every_numeric_option_declares_a_range():
    unbounded = [f"roll {' '.join(path)} {option.opts[0]}" for path, command in commands()
                 for option in numeric_options(command)
                 if not isinstance(option.type, (Bounded, VersionRange, CommaList)) or option.type.bounds is None]
    assert unbounded == []
    assert sum(len(numeric_options(c)) for _, c in commands()) > 100  # the enumeration finds them (iterate alone ~40)


def outside(option: click.Option, text: str) -> bool:
    """Whether `text` lies outside the option's declared range (or is no number of its kind)."""
    kind = option.type
    item = (kind.kind if isinstance(kind, Bounded) else kind.item if isinstance(kind, CommaList) else
            float if isinstance(kind, click.types.FloatParamType) else int)
    try:
        number = item(text)
    except ValueError:
        return True
    bounds = getattr(kind, "bounds", None)  # none: test_every_numeric_option_declares_a_range names the option
    return bounds is not None and bounds.refusal(number) is not None


@pytest.fixture(scope="module")
def cases_run(tmp_path_factory, tiny_model_dir):
    """A run with version 0 generated, verified and scored (the tiny model), shared by every case: a case
    that succeeds leaves what a user's rerun would find (v1 trained once, then skipped)."""
    from roll.pipeline.prepare import prepare
    from roll.runs import InitConfig, init_run
    from roll.stages.generate import GenerateConfig, run as generate
    from roll.store import Run

    root = tmp_path_factory.mktemp("bounds") / "run"
    init_run(InitConfig(run=root, model=str(tiny_model_dir)))
    generate(GenerateConfig(run=root, prompts=4, group_size=2, max_new_tokens=4))
    prepare(Run(root), [0])
    return root


SMALL = ("--prompts", "2", "--group-size", "2", "--max-new-tokens", "4")


def base_args(path: tuple[str, ...], run, tmp, model) -> list[str]:
    """Each command's other options, chosen so that a case that is accepted does little work."""
    loop = [*SMALL, "--iterations", "1", "--eval-every", "0", "--eval-k", "1", "--eval-limit", "2"]
    return {
        ("init",): ["--run", str(tmp / "init"), "--model", str(model)],
        ("warmstart",): ["--out", str(tmp / "warm"), "--steps", "1", "--eval-every", "0", "--eval-prompts", "2",
                         "--batch-size", "2"],
        ("generate",): ["--run", str(run), *SMALL, "--force"],
        ("evaluate",): ["--run", str(run), "--limit", "2", "--k", "1", "--max-new-tokens", "4"],
        ("ope",): ["--run", str(run), "--version", "0", "--data-versions", "0..0"],
        ("lambert",): ["--rewards", "1,0,0,1"],
        ("iterate",): ["--run", str(run), *loop],
        # the report is written under a file: every accepted case ends in one line (no directory there), after
        # the grid — no cells without --seeds — has run
        ("sweep",): ["--out", str(tmp / "afile"), "--seeds", "", *loop, "--model", str(model)],
        ("slurm", "render"): ["--run", str(run)],
        ("report",): ["--run", str(run), "--out", str(tmp / "report")],
        ("sql",): ["select 1", "--run", str(run)],
        ("import",): [str(tmp / "no-such-rows.jsonl"), "--run", str(run)],  # accepted values end in 'no such file'
    }.get(path, ["--run", str(run)])


def test_every_numeric_option_over_edge_values_is_one_line_and_exit_2_or_success(cases_run, tmp_path, tiny_model_dir):
    """0, −1, 1, 2⁶⁴, NaN and inf for every numeric option of every command, in-process (click's CliRunner):
    outside the declared range → exit 2 with exactly one line naming the option; inside → exit 0, or exit 2
    with one line (e.g. 'policy version 1 does not exist'), never a traceback."""
    (tmp_path / "afile").write_text("")
    runner = CliRunner()
    started, refused, accepted, succeeded = time.perf_counter(), 0, 0, 0
    for path, command in commands():
        for option in numeric_options(command):
            flag = option.opts[0]
            for value in EDGES:
                args = [*path, *base_args(path, cases_run, tmp_path, tiny_model_dir)]
                if flag in args and flag != "--run":  # the case's value replaces the base's
                    at = args.index(flag)
                    del args[at:at + 2]
                result = runner.invoke(cli, [*args, flag, value])
                lines = [line for line in result.stderr.splitlines() if line.startswith("roll: error: ")]
                case = f"roll {' '.join(args)} {flag} {value} -> {result.exit_code}: {result.stderr[-400:]}"
                assert result.exit_code in (0, 2), case + repr(result.exception)
                if result.exit_code == 2:
                    assert len(lines) == 1 and "Traceback" not in result.output, case
                if outside(option, value):
                    assert result.exit_code == 2 and lines[0].startswith(f"roll: error: {flag} "), case
                    refused += 1
                else:
                    accepted += 1
                    succeeded += result.exit_code == 0
    assert refused > accepted >= succeeded > 0  # both paths taken: 581 refusals, 235 accepted on 2026-12-06
    assert time.perf_counter() - started < 240, "the cases must stay cheap"


def test_the_issues_cases_are_refused_at_the_cli_with_one_line(cases_run):
    runner = CliRunner()
    for args, line in ((["generate", "--max-new-tokens", "0"], "--max-new-tokens 0: must be at least 1"),
                       (["train", "--grad-clip", "-1"], "--grad-clip -1.0: must be at least 0"),
                       (["generate", "--group-size", "100000000"], "--group-size 100000000: must be at most 65536"),
                       (["train", "--lr", "nan"], "--lr nan: must be a number"),
                       (["evaluate", "--top-p", "inf"], "--top-p inf: must be at most 1"),
                       (["train", "--clip-low", "1.5"], "--clip-low 1.5: must be at most 1")):
        result = runner.invoke(cli, [*args, "--run", str(cases_run)])
        assert result.exit_code == 2 and result.stderr == f"roll: error: {line}\n", result.stderr


def test_a_config_built_in_python_is_checked_the_same(cases_run):
    from roll.errors import RollError
    from roll.stages.generate import GenerateConfig, run as generate
    from roll.stages.train import TrainConfig, run as train

    with pytest.raises(RollError, match=r"^--max-new-tokens 0: must be at least 1$"):
        generate(GenerateConfig(run=cases_run, max_new_tokens=0))
    with pytest.raises(RollError, match=r"^--grad-clip -1.0: must be at least 0$"):
        train(TrainConfig(run=cases_run, grad_clip=-1.0))


def test_a_product_of_options_past_the_machines_memory_is_refused_before_any_work(cases_run):
    """5000 prompts × 65536 samples × ~60 tokens: terabytes of rows, on any machine. Refused before the weights
    load, in one line naming the options to lower; nothing is written."""
    from roll.store import Run

    before = Run(cases_run).files("rollouts", 0)
    started = time.perf_counter()
    result = CliRunner().invoke(cli, ["generate", "--run", str(cases_run), "--version", "0", "--prompts", "5000",
                                      "--group-size", "65536", "--force"])
    assert result.exit_code == 2, result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("roll: error: generate v0 shard 0/1 would need about ")
    assert "TiB" in line or float(line.split("about ")[1].split(" GiB")[0]) > 1000
    assert line.endswith("lower --prompts, --group-size, --max-new-tokens or --batch-size")
    assert time.perf_counter() - started < 30 and Run(cases_run).files("rollouts", 0) == before


def test_the_estimate_matches_a_hand_computation():
    """memory.sampling, training and scoring on a made-up shape, each term derived by hand."""
    from roll.memory import Shape, sampling, scoring, training

    shape = Shape(parameters=1_000_000, weight_bytes=2, vocab=1000, hidden=64, layers=2, heads=4, kv_width=32,
                  intermediate=256, context=4096, plain_head=False)
    # 8 prompts, G = 4, batch 16: 4 prompts × 4 = 16 rows a batch; T = 100 prompt + 28 new = 128
    est = sampling(shape, prompts=8, group_size=4, batch_size=16, prompt_tokens=100, max_new_tokens=28, top_p=1.0,
                   what="g", lower="x")
    assert est.device["weights"] == 2_000_000
    assert est.device["vocabulary"] == 16 * 1000 * (2 + 20)
    assert est.device["KV cache"] == 2 * 2 * 16 * 32 * 128 * 2 * 3 // 2  # + one layer's copy of two
    assert est.device["activations"] == 4 * 128 * (2 * 64 + 256) * 2 + 4 * 4 * 128 * 128 * 4
    assert est.host["rows"] == 8 * 4 * 128 * 120
    # train: float32 weights 4 MB, gradients + two moments 12 MB, micro-batch 8 of T = 128 on a whole head
    est = training(shape, rows=100, micro_batch=8, length=128, completion=28, lora=False, checkpointing=False)
    assert est.device["weights"] == 4_000_000 and est.device["gradients and AdamW state"] == 12_000_000
    assert est.device["activations"] == int(2 * 8 * 128 * 64 * (34 + 5 * 4 * 128 / 64) * 2)
    assert est.device["vocabulary"] == 2 * 8 * 28 * 1000 * 24
    est = scoring(shape, rows=10, batch_size=64, length=128, completion=28, models=2)  # a batch of the 10 rows
    assert est.device["weights"] == 4_000_000 and est.device["vocabulary"] == 10 * 28 * 1000 * 22


PEAK_PROGRAM = """
import json, sys
from roll import memory
from roll.stages.generate import GenerateConfig, run
from roll.rollouts import prompt_tokens
from roll.stages.generate import version_prompt_ids
from roll.store import Run
from transformers import AutoTokenizer

root, prompts, group, batch, new = sys.argv[1], *map(int, sys.argv[2:])
run(GenerateConfig(run=root, prompts=1, group_size=1, max_new_tokens=2, force=True))  # imports, allocator, weights
import threading, time


def anonymous_resident() -> int:
    # RssAnon: the heap and tensors only. File-backed pages (libtorch's code) are left out, since the kernel may
    # evict them under another process's memory pressure and fault them back in during the big run.
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024


before, peak, done = anonymous_resident(), [0], threading.Event()


def poll():  # the big tensors (KV cache, logits) live for the whole sampling loop, which a 2 ms poll sees
    while not done.is_set():
        peak[0] = max(peak[0], anonymous_resident())
        time.sleep(0.002)


poller = threading.Thread(target=poll)
poller.start()
run(GenerateConfig(run=root, prompts=prompts, group_size=group, batch_size=batch, max_new_tokens=new, force=True))
done.set()
poller.join()
after = peak[0]
r = Run(root)
table = r.read_prompts()
ids = version_prompt_ids([p for p, s in zip(table.column("prompt_id").to_pylist(), table.column("split").to_pylist())
                          if s == "train"], 0, prompts, 0)
encoded = prompt_tokens(table, AutoTokenizer.from_pretrained(str(r.policy_dir(0))), ids)
shape = memory.checkpoint_shape(r.policy_dir(0))
big = memory.sampling(shape, prompts=prompts, group_size=group, batch_size=batch, prompt_tokens=max(map(len, encoded)),
                      max_new_tokens=new, top_p=1.0, what="", lower="")
print(json.dumps({"measured": after - before, "estimate": big.total() - big.device["weights"]}))
"""


def test_the_estimate_bounds_a_measured_peak(tmp_path, tiny_model_dir):
    """A real `generate` of 2048 rows at once (8 prompts × G = 256) in a subprocess: the growth of its peak
    anonymous resident set (RssAnon polled during it, over RssAnon before it, after a warm-up run of one
    row) must lie between a quarter of the estimate
    and the estimate itself plus 25 %. The estimate is an upper bound by design: it assumes every row runs to
    --max-new-tokens, while rows that stop early leave the KV cache; the tiny random model stops some early."""
    from roll.runs import InitConfig, init_run

    root = tmp_path / "run"
    init_run(InitConfig(run=root, model=str(tiny_model_dir)))
    proc = subprocess.run([sys.executable, "-c", PEAK_PROGRAM, str(root), "8", "256", "2048", "64"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    numbers = json.loads(proc.stdout.strip().splitlines()[-1])
    measured, estimate = numbers["measured"], numbers["estimate"]
    assert estimate > 200 * 2 ** 20, numbers  # large against the allocator's and Python's noise (a few MiB)
    assert estimate / 4 <= measured <= estimate * 1.25, (numbers, measured / estimate)
