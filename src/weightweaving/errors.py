"""The one exception type a user's mistake raises; the CLI prints it as a single line."""

from __future__ import annotations

from collections.abc import Iterable


class WeightWeavingError(Exception):
    """A problem the user can fix: a bad file, option or value.

    The message is one line and names the file (and parameter) where there is one. The CLI prints
    it as ``error: <message>`` with no traceback.
    """

    def __init__(self, message: str, *, path: object | None = None, parameter: str | None = None) -> None:
        parts = []
        if path is not None:
            parts.append(f"{path}:")
        if parameter is not None:
            parts.append(f"parameter '{parameter}'")
        parts.append(message)
        super().__init__(_one_line(" ".join(parts)))
        self.path = path
        self.parameter = parameter


def _one_line(text: str) -> str:
    """Escape newlines and other control characters (a hostile file can put them in a name)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class OptionError(WeightWeavingError):
    """A bad option or hyperparameter value (names the option)."""


class CheckpointError(WeightWeavingError):
    """A checkpoint that cannot be read or does not fit the others."""


def did_you_mean(word: str, valid: Iterable[str]) -> str:
    """``"; did you mean 'ties'?"`` for the closest of ``valid`` (difflib), or ``""`` if none is close."""
    import difflib

    close = difflib.get_close_matches(str(word), sorted(valid), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""
