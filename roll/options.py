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
import math
import types
import typing
from pathlib import Path

import click

from roll.errors import RollError


# Ceilings shared by many options. A float option with no natural ceiling stops at float32's largest value:
# beyond it the number is inf in the float32 tensors it meets. Seeds stay in 32 bits (warmstart multiplies one by
# the batch size inside an int64 tensor); versions below a million (directory names are zero-padded to 4 digits).
FLOAT32_MAX = 3.4e38
SEED_MAX = 2 ** 32 - 1
VERSION_MAX = 10 ** 6 - 1
COUNT_MAX = 10 ** 7  # prompts, rows, steps: a count no run reaches; the memory estimate (roll.memory) bounds products
GROUP_MAX = 65536  # completions per prompt
BATCH_MAX = 1 << 20  # sequences per forward pass
TOKENS_MAX = 1 << 20  # completion length: past any model's context, which check_context then names
TEMPERATURE_MAX = 1000.0  # logits / T: at 1000 every distribution is uniform to float32 precision
TIMEOUT_MAX = 86400.0  # seconds


@dataclasses.dataclass(frozen=True)
class Range:
    """A numeric option's allowed values: lo/hi inclusive unless *_open. NaN is never allowed, nor an infinity
    (every range has a finite ceiling)."""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    @staticmethod
    def shown(bound) -> str:
        return str(bound) if isinstance(bound, int) else f"{bound:g}"

    def refusal(self, number) -> str | None:
        """Why `number` is outside the range (None when inside): the end of a one-line error."""
        if isinstance(number, float) and math.isnan(number):
            return "must be a number"
        if self.lo is not None and (number <= self.lo if self.lo_open else number < self.lo):
            return f"must be {'>' if self.lo_open else 'at least'} {self.shown(self.lo)}"
        if self.hi is not None and (number >= self.hi if self.hi_open else number > self.hi):
            return f"must be {'<' if self.hi_open else 'at most'} {self.shown(self.hi)}"
        if isinstance(number, float) and math.isinf(number):
            return "must be finite"
        return None

    def check(self, flag: str, number) -> None:
        problem = self.refusal(number)
        if problem:
            raise RollError(f"{flag} {number}: {problem}")


def option(default=dataclasses.MISSING, help: str = "", *, factory=None, flag: str | None = None,  # noqa: A002
           choices: tuple[str, ...] | None = None, group: str | None = None, show_default: bool = True,
           repeatable: bool = False, min: float | None = None, max: float | None = None,  # noqa: A002
           min_open: bool = False, max_open: bool = False):
    """A config field with its CLI spelling: `flag` overrides --field-name, `choices` makes a click.Choice,
    `repeatable` takes a tuple field from a repeated option (--version 1 --version 2; a tuple field otherwise
    reads a comma-separated list), and `show_default=False` leaves the default to the help text (for a None
    that means "chosen later"). A numeric field (or a tuple of numbers) declares its range with `min`/`max`
    (inclusive unless `min_open`/`max_open`): the CLI refuses a value outside it, NaN or an infinity with one
    line before any work, and `check_ranges` does the same for a config built in Python."""
    metadata = {"help": help, "flag": flag, "choices": choices, "group": group, "show_default": show_default,
                "repeatable": repeatable,
                "range": None if min is None and max is None else Range(min, max, min_open, max_open)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# Options several stages share, each declared here once (a field object cannot be shared between dataclasses,
# so each is a function that makes a fresh one).
def device_option():
    return option("auto", "auto, cpu or cuda.")


def seed_option(help: str):  # noqa: A002
    return option(0, help, min=0, max=SEED_MAX)


def version_option(help: str, **kwargs):  # noqa: A002
    """An optional policy version (None: chosen later)."""
    return option(None, help, show_default=False, min=0, max=VERSION_MAX, **kwargs)


def rollout_shard_option():
    from roll.store import Shard

    return option(help="This process's part i/N: the rollout files whose index is i modulo N (a Slurm array task).",
                  factory=lambda: Shard(0, 1))


def versions_option():
    return option(None, "Behaviour version to process (repeatable). [default: every version with rollouts]",
                  flag="--version", repeatable=True, show_default=False, min=0, max=VERSION_MAX)


def check_ranges(config) -> None:
    """A stage's first check: every numeric field of `config` (a numbers tuple item by item) inside the range its
    option declares, NaN and infinities refused — the CLI checks the same while parsing; this catches a config
    built in Python (roll iterate's, a test's). Nested configs are checked by their own stage."""
    for f in dataclasses.fields(config):
        bounds = f.metadata.get("range")
        value = getattr(config, f.name)
        if bounds is None or value is None:
            continue
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        for number in value if isinstance(value, tuple) else (value,):
            bounds.check(flag, number)


class Bounded(click.ParamType):
    """An int or float inside a Range. A value that is not a number, NaN, an infinity or out of range is one line
    (RollError) naming the option, not click's usage block; --help shows the range."""

    def __init__(self, kind: type, bounds: Range):
        self.kind, self.bounds = kind, bounds
        self.name = "integer" if kind is int else "float"

    def convert(self, value, param, ctx):
        flag = param.opts[0] if param is not None else "value"
        if isinstance(value, self.kind) and not isinstance(value, bool):
            number = value
        else:
            try:
                number = self.kind(str(value).strip())
            except ValueError:
                raise RollError(f"{flag} {value}: expected {'an integer' if self.kind is int else 'a number'}") from None
        self.bounds.check(flag, number)
        return number

    def get_metavar(self, param, ctx=None):
        lo, hi = self.bounds.lo, self.bounds.hi
        left = "" if lo is None else f"{Range.shown(lo)}{'<' if self.bounds.lo_open else '<='}"
        right = "" if hi is None else f"{'<' if self.bounds.hi_open else '<='}{Range.shown(hi)}"
        return f"{self.name.upper()} {left}x{right}"


class ShardType(click.ParamType):
    """--shard i/N, parsed by the store (a bad value is one line and exit 2, as every bad input)."""
    name = "i/N"

    def convert(self, value, param, ctx):
        from roll.store import Shard

        return value if isinstance(value, Shard) else Shard.parse(value, param.opts[0] if param else "--shard")


class VersionRange(click.ParamType):
    """a..b (or one version a) → (a, b), each inside `bounds`."""
    name = "a..b"

    def __init__(self, bounds: Range | None = None):
        self.bounds = bounds

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        flag = f"--{param.name.replace('_', '-')}"
        lo, _, hi = str(value).partition("..")
        try:
            pair = int(lo), int(hi or lo)
        except ValueError:
            raise RollError(f"{flag} {value}: write a..b (e.g. 3..5) or one version") from None
        for number in pair if self.bounds else ():
            self.bounds.check(flag, number)
        return pair


class CommaList(click.ParamType):
    """Comma-separated values → a tuple of `item` (str or int)."""

    def __init__(self, item=str, bounds: Range | None = None):
        self.item, self.name, self.bounds = item, f"{item.__name__},...", bounds

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        flag = f"--{param.name.replace('_', '-')}"
        try:
            items = tuple(self.item(x.strip()) for x in str(value).split(",") if x.strip())
        except ValueError:
            raise RollError(f"{flag} {value}: expected comma-separated {self.item.__name__}s") from None
        for number in items if self.bounds else ():
            self.bounds.check(flag, number)
        return items


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
    bounds = meta.get("range")
    if typing.get_origin(base) is tuple:
        items = typing.get_args(base)
        if items == (int, int):
            return VersionRange(bounds), False
        if len(items) == 2 and items[1] is Ellipsis:
            if meta["repeatable"]:
                return (Bounded(items[0], bounds) if bounds and items[0] in (int, float) else items[0]), True
            return CommaList(items[0], bounds), False
    if base in (int, float) and bounds is not None:
        return Bounded(base, bounds), False
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
