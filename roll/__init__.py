"""roll: reinforcement learning of language-model reasoning from off-policy (stale, lagged) data.

Stages exchange Parquet shards in a run directory (`roll.store`); each stage is a module in `roll.stages`
with one entry function `run(config) -> summary`; the CLI (`roll.cli`) only parses options.
"""

__version__ = "0.1.0"
