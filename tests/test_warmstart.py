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
