"""Table schemas: one per table, the contract SQL users rely on (DESIGN §3.2), and the checks that a
table or file holds them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from roll.errors import RollError

# ---------------------------------------------------------------------------------------------- schemas
# One schema per table. The required columns of DESIGN §3.2 are the contract SQL users rely on; the rest
# are what the stages need to stay reproducible (prompt tokens, sampler settings, verifier versions).


def _schema(*fields: tuple[str, pa.DataType], nullable: tuple[str, ...] = ()) -> pa.Schema:
    return pa.schema([pa.field(name, dtype, nullable=name in nullable) for name, dtype in fields])


_KEY = (("policy_version", pa.int64()), ("prompt_id", pa.string()), ("sample_index", pa.int64()))

SCHEMAS: dict[str, pa.Schema] = {
    "prompts": _schema(
        ("prompt_id", pa.string()), ("task", pa.string()), ("split", pa.string()),
        ("prompt", pa.string()), ("answer", pa.string()), ("metadata", pa.string()),
    ),
    "rollouts": _schema(
        *_KEY,
        ("completion", pa.string()),
        ("prompt_token_ids", pa.list_(pa.int32())),
        ("token_ids", pa.list_(pa.int32())),
        ("behaviour_logprobs", pa.list_(pa.float32())),  # log-prob of each sampled token under the sampler
        ("num_tokens", pa.int64()),
        ("finish_reason", pa.string()),  # "stop" (a stop token emitted) or "length" (max_new_tokens reached)
        ("stop_token_id", pa.int64()),  # which stop token ended it (null at the length limit), as vLLM's stop_reason
        ("max_new_tokens", pa.int64()),
        ("temperature", pa.float64()),
        ("top_p", pa.float64()),
        ("seed", pa.int64()),  # the row's sampling seed: prompt_seed(--seed, version, prompt_id) + sample_index
        ("backend", pa.string()),
        ("generation_id", pa.string()),  # content hash of the committed shard, stamped by Run.commit_shard
        # the version of this run whose checkpoint sampled the row: policy_version for roll's own rows; for
        # imported rows the --model-version given, else null (sampled elsewhere)
        ("model_version", pa.int64()),
        ("source", pa.string()),  # "generate", or "import FILE sha256:DIGEST row N" (roll import)
        # behaviour_logprobs null: imported without them (roll score names the checkpoint that stands for π_b);
        # seed null: sampled elsewhere
        nullable=("stop_token_id", "behaviour_logprobs", "seed", "model_version"),
    ),
    "verdicts": _schema(
        *_KEY,
        ("reward", pa.float64()), ("correct", pa.bool_()), ("extracted_answer", pa.string()),
        ("format_ok", pa.bool_()), ("verifier", pa.string()), ("milliseconds", pa.float64()),
        ("error", pa.string()),
        ("generation_id", pa.string()),  # of the rollouts verified: redone, never joined, when they change
        # JSON: the terms the reward is the weighted sum of, [{"reward": spec, "weight": w, "value": v[, "error"]}]
        # (roll/rewards.py); NULL in verdicts written before it was recorded
        ("reward_terms", pa.string()),
        nullable=("reward_terms",),
    ),
    "scores": _schema(
        *_KEY,
        ("behaviour_logprob_sum", pa.float64()), ("ref_logprob_sum", pa.float64()),
        ("mismatch_max_abs", pa.float64()), ("mismatch_kl", pa.float64()),
        ("trainer_logprobs", pa.list_(pa.float32())), ("ref_logprobs", pa.list_(pa.float32())),
        ("group_size", pa.int64()), ("group_reward_mean", pa.float64()), ("group_reward_std", pa.float64()),
        ("generation_id", pa.string()),  # of the rollouts scored
        # the version whose checkpoint gave trainer_logprobs (log π_b with training numerics); null: the row's
        # imported behaviour_logprobs stand for π_b (sampled elsewhere, no checkpoint here)
        ("behaviour_checkpoint", pa.int64()),
        # null when scored with --no-ref: π_ref's forward pass is skipped unless the objective reads it; the
        # mismatch columns are null for rows imported without the sampler's log-probs (nothing to compare)
        nullable=("ref_logprob_sum", "ref_logprobs", "behaviour_checkpoint", "mismatch_max_abs", "mismatch_kl"),
    ),
    "steps": _schema(
        ("policy_version", pa.int64()), ("step", pa.int64()), ("objective", pa.string()),
        ("loss", pa.float64()), ("entropy", pa.float64()), ("kl_behaviour", pa.float64()),
        ("clip_fraction", pa.float64()), ("ess", pa.float64()), ("grad_norm", pa.float64()),
        ("lr", pa.float64()), ("tokens", pa.int64()), ("seconds", pa.float64()),
        ("ratio_min", pa.float64()), ("ratio_mean", pa.float64()), ("ratio_max", pa.float64()),
        ("global_step", pa.int64()),  # optimiser steps taken in the whole run before this one (DESIGN §3.1a)
        ("log_ratio_mean", pa.float64()),  # mean signed sequence Δ = log π_θ − log π_b over the step's samples
        ("log_ratio_sq_mean", pa.float64()),  # token-mean (log ρ)², M2PO's second moment of the token log-ratios
        ("lag_mean", pa.float64()),  # mean version lag of the step's samples
        ("stale_steps_mean", pa.float64()),  # mean optimiser steps since the samples' behaviour version
    ),
    "groups": _schema(
        ("policy_version", pa.int64()), ("data_version", pa.int64()), ("lag", pa.int64()),
        ("optimizer_steps", pa.int64()),  # optimiser steps since the behaviour version, when first used (DESIGN §3.1)
        ("prompt_id", pa.string()), ("objective", pa.string()), ("beta", pa.float64()),
        ("m", pa.float64()), ("k", pa.float64()), ("regime", pa.string()),
        ("induced_entropy", pa.float64()), ("boltzmann_entropy", pa.float64()),
        ("reward_mean", pa.float64()), ("reward_std", pa.float64()),
        ("step", pa.int64()),  # the update's optimiser step that first used the group
        ("log_ratio_mean", pa.float64()),  # mean signed Δ of the group's samples when first used
    ),
    "evals": _schema(
        ("policy_version", pa.int64()), ("dataset", pa.string()), ("prompt_id", pa.string()),
        ("sample_index", pa.int64()), ("correct", pa.bool_()), ("extracted_answer", pa.string()),
        ("num_tokens", pa.int64()),
        ("settings", pa.string()),  # JSON: k, limit, temperature, top_p, max_new_tokens, seed
    ),
    # roll ope: per stale row, its log-weight under a target version (DESIGN §7) …
    "ope": _schema(
        ("target_version", pa.int64()), *_KEY,  # policy_version: the behaviour version that sampled the row
        ("reward", pa.float64()), ("num_tokens", pa.int64()),
        ("target_logprob_sum", pa.float64()),  # log π_v(y | x) at the row's temperature and top-p
        ("behaviour_logprob_sum", pa.float64()),  # log π_b(y | x), the sampler's own
        ("log_weight", pa.float64()),  # their difference: the sequence's log importance weight
        ("generation_id", pa.string()),  # of the rollouts weighted
    ),
    # … and one row per (target version, data versions, δ, λ rule): the estimates
    "ope_summary": _schema(
        ("target_version", pa.int64()), ("data_lo", pa.int64()), ("data_hi", pa.int64()),
        ("prompts", pa.int64()), ("rows", pa.int64()), ("delta", pa.float64()), ("lambda_rule", pa.string()),
        ("lambda", pa.float64()), ("ls_estimate", pa.float64()), ("ls_bound", pa.float64()),
        ("ips", pa.float64()), ("log_ips", pa.float64()), ("snips", pa.float64()),
        ("ess", pa.float64()), ("ess_share", pa.float64()), ("heavy_share", pa.float64()),
    ),
}

@dataclass(frozen=True)
class CopyOf:
    """An added column whose value, in a file written before it existed, is another column's (ADDED_COLUMNS)."""

    column: str


# Columns added after files of their table were first written, with the value an older file's rows read as:
# a constant (None is null) or CopyOf another column. A run made by an earlier roll stays readable, and reads
# the same through `read_table` and through `roll sql` (roll/store/sql.py turns each into a SQL expression).
ADDED_COLUMNS: dict[str, dict[str, object]] = {
    "rollouts": {"model_version": CopyOf("policy_version"), "source": "generate"},
    "scores": {"behaviour_checkpoint": CopyOf("policy_version")},
    "verdicts": {"reward_terms": None},
}


# Float columns that must hold finite numbers: a NaN reward would silently poison every update downstream.
FINITE_COLUMNS = {"verdicts": ("reward",)}

# Tables written as shards per behaviour version, and the tables written once per produced version.
SHARDED_TABLES = ("rollouts", "verdicts", "scores")
TRAIN_TABLES = ("steps", "groups")
OPE_TABLES = ("ope", "ope_summary")
# The tables the `samples` view joins.
SAMPLES_TABLES = {"rollouts", "verdicts", "scores"}


def empty_table(name: str) -> pa.Table:
    return SCHEMAS[name].empty_table()


def check_schema(table: pa.Table, name: str, where: str | Path) -> pa.Table:
    """Return `table` with exactly the columns of schema `name`, in order; refuse it naming file and column.

    Extra columns are tolerated on read (more columns are welcome) and dropped; a missing column, a column
    of another type, or a null in a column that may not hold one is refused.
    """
    schema = SCHEMAS[name]
    for column_name, value in ADDED_COLUMNS.get(name, {}).items():
        if column_name not in table.column_names:
            field = schema.field(column_name)
            try:
                column = (table.column(value.column) if isinstance(value, CopyOf)
                          else pa.array([value] * table.num_rows, field.type))
            except KeyError:  # what it is made from is missing too: refused by name below
                continue
            table = table.append_column(field, column)
    for field in schema:
        problem = _field_problem(table.schema, field, name)
        if problem:
            raise RollError(f"{where}: {problem}")
        column = table.column(field.name)
        if not field.nullable and column.null_count:
            raise RollError(f"{where}: column '{field.name}' holds {column.null_count} null value(s)")
    for column_name in FINITE_COLUMNS.get(name, ()):
        import pyarrow.compute as pc

        finite = pc.is_finite(table.column(column_name)).combine_chunks()
        if finite.false_count:
            row = finite.to_pylist().index(False)
            value = table.column(column_name)[row].as_py()
            raise RollError(f"{where}: row {row} has {column_name} {value}; it must be a finite number")
    return table.select(schema.names)


def schema_problem(schema: pa.Schema, name: str) -> str | None:
    """Why a file of `schema` cannot be read as table `name` (a column missing or of another type), or None."""
    return next((problem for field in SCHEMAS[name] if (problem := _field_problem(schema, field, name))), None)


def _field_problem(schema: pa.Schema, field: pa.Field, name: str) -> str | None:
    index = schema.get_field_index(field.name)
    if index < 0 and field.name in ADDED_COLUMNS.get(name, {}):
        return None
    if index < 0:
        return f"{name} table has no column '{field.name}' (expected {field.type})"
    if not schema.field(index).type.equals(field.type):
        return f"column '{field.name}' has type {schema.field(index).type}, expected {field.type}"
    return None


