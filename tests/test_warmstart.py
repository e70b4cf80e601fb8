"""warmstart: supervised steps on solved problems lower the loss, and the checkpoint loads back."""
from __future__ import annotations

import json

from roll.policy import load_policy
from roll.tasks import arith_rows, extract_arith_answer
from roll.warmstart import WarmstartConfig, run


def test_a_few_steps_lower_the_loss(tmp_path):
    summary = run(WarmstartConfig(out=tmp_path / "m", steps=25, batch_size=16, lr=3e-3, eval_every=0))
    losses = summary["losses"]
    assert len(losses) == 25
    # random init starts near log(vocab) = log 51 ≈ 3.93; 25 steps already learn the character distribution
    assert abs(losses[0] - 3.93) < 0.3
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0
    model, tokenizer = load_policy(tmp_path / "m")
    assert sum(p.numel() for p in model.parameters()) == summary["parameters"] == 1_814_208
    assert json.loads((tmp_path / "m" / "warmstart.json").read_text())["steps"] == 25


def test_arith_task_solutions_are_exact():
    rows = arith_rows(seed=0)
    assert len(rows) == 5500 and len({r["prompt"] for r in rows}) == 5500
    for row in rows[:200]:
        solution = json.loads(row["metadata"])["solution"]
        expression = json.loads(row["metadata"])["expression"]
        assert str(eval(expression)) == row["answer"]  # noqa: S307 - our own generated arithmetic, not model output
        assert extract_arith_answer(solution) == row["answer"]
    assert extract_arith_answer("12+7=19\nanswer: 19") == "19"
    assert extract_arith_answer("answer: 19\nmore") is None
    assert extract_arith_answer("answer: -007") == "-7"


def test_chain_task_solutions_are_exact_and_as_long_as_the_design_says():
    """Every step line recomputes: the state named on the left is the previous line's, the operation is the
    prompt's, the arithmetic is right and the state stays in 1…99; the answer is the last state. At the default
    difficulty a solution (with EOS) is 150–250 tokens of the embedded tokenizer, none of them <unk>."""
    import re

    from roll.policy import build_default_tokenizer
    from roll.tasks import CHAIN_LIMIT, CHAIN_STEPS, chain_rows, chain_steps

    rows = chain_rows(seed=0)
    assert len(rows) == 5500 and len({r["prompt"] for r in rows}) == 5500
    assert {r["split"] for r in rows[:5000]} == {"train"} and {r["split"] for r in rows[5000:]} == {"test"}
    line = re.compile(r"s(\d+) = s(\d+)([-+*])(\d) = (\d+)([-+*]\d) = (\d+)")
    for row in rows[:300]:
        meta = json.loads(row["metadata"])
        operations = row["prompt"].removeprefix("Q: chain ").split()
        lines = meta["solution"].splitlines()
        assert meta["steps"] == CHAIN_STEPS == len(operations) - 1 == len(lines) - 2
        state = int(operations[0])
        assert lines[0] == f"s0 = {state}"
        for step, (text, operation) in enumerate(zip(lines[1:-1], operations[1:], strict=True), 1):
            match = line.fullmatch(text)
            assert match, text
            assert (int(match.group(1)), int(match.group(2))) == (step, step - 1)
            assert match.group(3) + match.group(4) == match.group(6) == operation and int(match.group(5)) == state
            state = eval(f"{state}{operation}")  # noqa: S307 - our own generated arithmetic, not model output
            assert int(match.group(7)) == state and 1 <= state <= CHAIN_LIMIT
        assert lines[-1] == f"answer: {state}" and extract_arith_answer(meta["solution"]) == row["answer"] == str(state)
    tokenizer = build_default_tokenizer()
    lengths = [len(tokenizer(json.loads(r["metadata"])["solution"], add_special_tokens=False)["input_ids"]) + 1
               for r in rows]
    assert 150 <= min(lengths) and max(lengths) <= 250
    assert not any(tokenizer.unk_token_id in tokenizer(r["prompt"] + json.loads(r["metadata"])["solution"])["input_ids"]
                   for r in rows[:500])
    assert chain_steps("chain:12") == 12 and chain_steps("arith") is None
    assert {json.loads(r["metadata"])["steps"] for r in chain_rows(seed=0, steps=3)} == {3}


def test_chain_difficulty_out_of_range_is_one_line():
    import pytest

    from roll.errors import RollError
    from roll.tasks import build_prompts

    for task in ("chain:1", "chain:25", "chain:x", "chain:"):
        with pytest.raises(RollError, match=r"chain:S takes a number of steps S from 2 to 24"):
            build_prompts(task)
