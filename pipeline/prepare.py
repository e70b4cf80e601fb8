"""prepare: make what an update reads — verdicts, scores, apo's version-0 samples — before train runs.

`roll train` trains only: it refuses (one line, naming the command) a window with unverified or unscored rows.
The one-command main job (`roll generate && roll train`) keeps working because the callers — `roll train`'s
command line and `roll iterate` — call `prepare_update` first. Orchestration of stages lives here, in the
pipeline, so no stage imports another and `stages/` imports nothing from `roll.pipeline` (tests/test_house.py).
"""
from __future__ import annotations

import hashlib
import sys
from collections import Counter

from roll.stages.train import TrainConfig
from roll.store import Run


def prepare_update(config: TrainConfig, world: int = 1) -> None:
    """Verify and score the versions update `config.version` (the latest when None) reads, and for an objective
    whose value comes from version 0 (apo) sample version-0 completions for its prompts that have none.

    Train's own refusals of bad options and of a window too big for memory (over `world` processes) come
    first, before any work. A window with no rollouts is left to train, which refuses it with the command
    to run."""
    from roll.objectives import get_objective, uses_reference
    from roll.policy import pick_device
    from roll.stages.train import check_config, check_update, load_rows, take_slice, version0_rewards
    from roll.store import data_window

    check_config(config)
    run = Run(config.run)
    version = run.latest_policy_version() if config.version is None else config.version
    lo, hi = data_window(version, config.lag, config.window)
    data_versions = [v for v in run.versions("rollouts") if lo <= v <= hi]
    if not data_versions or version + 1 in run.policy_versions() and not config.force:
        return  # nothing to read, or the update is made (train says which)
    check_update(run, version, config, pick_device(config.device), world)
    prepare(run, data_versions, ref=uses_reference(config.objective, config))
    if get_objective(config.objective).value != "version0":
        return
    rows = take_slice(load_rows(run, lo, hi), config)
    _, missing = version0_rewards(run, rows)
    if missing:
        tag = f"{config.objective}-v{rows[0]['policy_version']:04d}-{len(missing)}"
        supplement_version0(run, missing, rows, tag, config.objective)


def prepare(run: Run, versions: list[int], ref: bool = True) -> None:
    """Verify and score the selected versions that lack verdicts or scores, saying so in one line each.

    With `ref`, scores must hold π_ref's log-probs: versions scored without them (`--no-ref`) are re-scored.
    """
    from roll.stages import score, verify
    from roll.store import named_query

    for table, stage, config in (("verdicts", verify, verify.VerifyConfig), ("scores", score, score.ScoreConfig)):
        todo = run.versions_pending(table, versions)
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


def supplement_version0(run: Run, prompt_ids: list[str], rows, tag: str, objective: str) -> None:
    """Sample version-0 completions for `prompt_ids` with the sampler settings and group size of `rows` (file
    extra-<tag>), verify and score them; later updates reuse them."""
    from roll.policy import load_policy, pick_device
    from roll.rollouts import prompt_tokens, sample_rollouts

    print(f"roll: {objective} needs version-0 samples of {len(prompt_ids)} prompt(s); generating them from v0", file=sys.stderr)
    group = max(Counter(zip(rows.scalars["policy_version"], rows.scalars["prompt_id"], strict=True)).values())
    model, tokenizer = load_policy(run.policy_dir(0), pick_device("auto"))
    table = sample_rollouts(model, tokenizer, 0, prompt_ids, prompt_tokens(run.read_prompts(), tokenizer, prompt_ids),
                            group_size=group, max_new_tokens=rows[0]["max_new_tokens"],
                            temperature=rows[0]["temperature"], top_p=rows[0]["top_p"],
                            seed=int(hashlib.sha256(tag.encode()).hexdigest()[:12], 16), batch_size=256, backend="hf",
                            description=f"generate v0 for {objective}")
    run.commit_shard("rollouts", 0, run.extra_path("rollouts", 0, tag).name, table)
    prepare(run, [0])
