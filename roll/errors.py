"""The one exception type that reaches users as a single clear line (DESIGN §6)."""


class RollError(Exception):
    """Bad input or a broken run: the message says what is wrong and where; the CLI exits non-zero."""
