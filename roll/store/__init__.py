"""The store: the run directory's layout, shard names, table schemas, atomic commits, locks, checkpoints and
DuckDB views (DESIGN §3.2), in five rooms:

    schemas     one schema per table, and the checks that a table holds it
    commit      atomic writes (temporary, fsync, rename), lock files, and the footer checks that a committed
                file holds what its place says
    checkpoint  a policy directory's layout: policy.json, weights, master weights, adapters, optimiser state
    run         the `Run` class: every path inside a run, what is committed, locks by name
    sql         the sandboxed DuckDB connection, `roll sql`'s read-only queries, the stages' named queries

Nothing else in roll builds a path inside a run by hand; every table is written and read through here, so
the schema is checked on both sides and a half-written file is never visible:

    run.toml                                      the run's configuration
    prompts/prompts.parquet                       prompt_id, task, split, prompt, answer, metadata
    policies/v0000/                               save_pretrained output + policy.json
    rollouts/version=0000/part-00000-of-00004.parquet
    verdicts/version=0000/…   scores/version=0000/…
    train/version=0001/steps.parquet   train/version=0001/groups.parquet
    evals/version=0001/<dataset>-<settings hash>.parquet

Every public name of the rooms is importable from `roll.store` itself, as before the split.
"""
from roll.store.checkpoint import *  # noqa: F403
from roll.store.commit import *  # noqa: F403
from roll.store.run import *  # noqa: F403
from roll.store.schemas import *  # noqa: F403
from roll.store.sql import *  # noqa: F403
