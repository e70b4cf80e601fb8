"""prepare: verify and score what an update needs and lacks, by running those stages (train calls it first).

Orchestration of stages lives in the pipeline, so no stage imports another (train reaches verify and score
only through here).
"""
from __future__ import annotations

import sys

from roll.store import Run


def prepare(run: Run, versions: list[int], ref: bool = True) -> None:
    """Verify and score the selected versions that lack verdicts or scores, saying so in one line each.

    With `ref`, scores must hold π_ref's log-probs: versions scored without them (`--no-ref`) are re-scored.
    """
    from roll.stages import score, verify
    from roll.store import Shard, named_query

    for table, stage, config in (("verdicts", verify, verify.VerifyConfig), ("scores", score, score.ScoreConfig)):
        todo = sorted({v for v, _, _ in run.pending_shards(table, versions, Shard(0, 1), False)})
        if todo:
            print(f"roll: {table} missing for version(s) {', '.join(map(str, todo))}; running {stage.__name__.split('.')[-1]}",
                  file=sys.stderr)
            extra = {"ref": ref} if stage is score else {}
            stage.run(config(run=run.root, versions=tuple(todo), **extra))
    if ref:
        lacking = [r["policy_version"] for r in named_query(run, "versions_without_ref", versions=versions)]
        if lacking:
            print(f"roll: scores of version(s) {', '.join(map(str, lacking))} have no π_ref log-probs; re-scoring",
                  file=sys.stderr)
            score.run(score.ScoreConfig(run=run.root, versions=tuple(lacking), ref=True, force=True))
