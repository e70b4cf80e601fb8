"""Options declared once: a stage's config dataclass field holds its default and its one-line help, and the
command line's options are generated from it (as tyro does for CleanRL's `Args`, and sqlite-utils groups its
click options as decorators).

    @dataclass(frozen=True)
    class GenerateConfig:
        prompts: int = option(64, "Train prompts drawn per version (across all shards).", group="sampling")

    @cli.command()
    @config_options(GenerateConfig)
    def generate(**values): ...          # values["prompts"] is the --prompts the user gave, or 64

A field without help (the run directory, nested configs) is not an option. `group` names the fields that
another command passes through (roll iterate and sweep take generate's "sampling" and train's "training"
fields), so no hand-kept list of names splits their options.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import click

from roll.errors import RollError


def option(default=dataclasses.MISSING, help: str = "", *, factory=None, flag: str | None = None,  # noqa: A002
           choices: tuple[str, ...] | None = None, group: str | None = None, show_default: bool = True,
           repeatable: bool = False):
    """A config field with its CLI spelling: `flag` overrides --field-name, `choices` makes a click.Choice,
    `repeatable` takes a tuple field from a repeated option (--version 1 --version 2; a tuple field otherwise
    reads a comma-separated list), and `show_default=False` leaves the default to the help text (for a None
    that means "chosen later")."""
    metadata = {"help": help, "flag": flag, "choices": choices, "group": group, "show_default": show_default,
                "repeatable": repeatable}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# Options several stages share, each declared here once (a field object cannot be shared between dataclasses,
# so each is a function that makes a fresh one).
def device_option():
    return option("auto", "auto, cpu or cuda.")


def rollout_shard_option():
    from roll.store import Shard

    return option(help="This process's part i/N: the rollout files whose index is i modulo N (a Slurm array task).",
                  factory=lambda: Shard(0, 1))


def versions_option():
    return option(None, "Behaviour version to process (repeatable). [default: every version with rollouts]",
                  flag="--version", repeatable=True, show_default=False)


class ShardType(click.ParamType):
    """--shard i/N, parsed by the store (a bad value is one line and exit 2, as every bad input)."""
    name = "i/N"

    def convert(self, value, param, ctx):
        from roll.store import Shard

        return value if isinstance(value, Shard) else Shard.parse(value, param.opts[0] if param else "--shard")


class VersionRange(click.ParamType):
    """a..b (or one version a) → (a, b)."""
    name = "a..b"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        lo, _, hi = str(value).partition("..")
        try:
            return int(lo), int(hi or lo)
        except ValueError:
            raise RollError(f"--{param.name.replace('_', '-')} {value}: write a..b (e.g. 3..5) or one version") from None


class CommaList(click.ParamType):
    """Comma-separated values → a tuple of `item` (str or int)."""

    def __init__(self, item=str):
        self.item, self.name = item, f"{item.__name__},..."

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            return tuple(self.item(x.strip()) for x in str(value).split(",") if x.strip())
        except ValueError:
            raise RollError(f"--{param.name.replace('_', '-')} {value}: expected comma-separated {self.item.__name__}s") from None


def _click_type(hint, meta):
    """(click type, multiple) for a field's type hint."""
    if meta["choices"]:
        return click.Choice(list(meta["choices"])), False
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1 else hint
    from roll.store import Shard

    if base is Shard:
        return ShardType(), False
    if base is Path:
        return click.Path(path_type=Path), False
    if typing.get_origin(base) is tuple:
        items = typing.get_args(base)
        if items == (int, int):
            return VersionRange(), False
        if len(items) == 2 and items[1] is Ellipsis:
            return (items[0], True) if meta["repeatable"] else (CommaList(items[0]), False)
    if base in (int, float, str, bool):
        return base, False
    return None, False


def options_of(cls, group: str | None = None, only: tuple[str, ...] = ()) -> list[click.Option]:
    """click Options for `cls`'s fields that carry help (only those of `group`, or named in `only`, when given)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("help") or (group is not None and meta.get("group") != group) or (only and f.name not in only):
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        kind, multiple = _click_type(hints[f.name], meta)
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        if hints[f.name] is bool and default is False:
            decl, extra = [flag], {"is_flag": True}
        elif hints[f.name] is bool:
            decl, extra = [f"{flag}/--no-{flag[2:]}"], {}
        else:
            decl, extra = [flag], {"type": kind, "multiple": multiple}
        shown = meta["show_default"] and default not in (None, "") and not (hints[f.name] is bool and default is False)
        if isinstance(default, tuple) and not multiple:
            default = ",".join(map(str, default))  # a comma list shows as the user writes it
        option = click.Option(decl + [f.name], default=() if multiple else default, help=meta["help"],
                              show_default=bool(shown), **extra)
        option.config_field = (cls.__name__, f.name)  # read by tests/test_cli.py: every field has its option
        out.append(option)
    return out


def config_options(cls, group: str | None = None, only: tuple[str, ...] = ()):
    """Decorator: add `cls`'s options to a click command, in field order."""
    def apply(command):
        params = options_of(cls, group, only)
        command.__click_params__ = getattr(command, "__click_params__", []) + list(reversed(params))
        return command
    return apply


def config_values(cls, values: dict, group: str | None = None) -> dict:
    """The entries of `values` that are `cls`'s options (of `group`), with an empty repeatable option as None."""
    fields = {f.name: f for f in dataclasses.fields(cls)
              if f.metadata.get("help") and (group is None or f.metadata.get("group") == group)}
    out = {}
    for name, value in values.items():
        if name in fields:
            out[name] = None if value == () and fields[name].default is None else value
    return out
