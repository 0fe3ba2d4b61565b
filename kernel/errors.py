"""User-facing errors.

Anything a user can fix (a profile typo, a missing folder, a dataset with no
usable item) is a :class:`WantrainError`. The CLI prints each one as a single
line ``error: <where>: <what> (got <value>); <fix>`` and exits with code 2,
without a traceback. Bugs are ordinary exceptions and keep their traceback.
"""

from __future__ import annotations

from typing import Any, Iterable


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class ProfileProblem:
    """One fixable problem, located by its TOML path."""

    __slots__ = ("where", "what", "got", "fix")

    _MISSING = object()

    def __init__(self, where: str, what: str, got: Any = _MISSING, fix: str = ""):
        self.where = where
        self.what = what
        self.got = got
        self.fix = fix

    def line(self) -> str:
        text = f"error: {self.where}: {self.what}"
        if self.got is not ProfileProblem._MISSING:
            text += f" (got {_show(self.got)})"
        if self.fix:
            text += f"; {self.fix}"
        return text

    def __repr__(self) -> str:
        return f"ProfileProblem({self.line()!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ProfileProblem) and self.line() == other.line()

    def __hash__(self) -> int:
        return hash(self.line())


class WantrainError(Exception):
    """A mistake the user can fix. Carries one or more problems."""

    exit_code = 2

    def __init__(self, problems: ProfileProblem | Iterable[ProfileProblem] | str):
        if isinstance(problems, str):
            problems = [ProfileProblem("wantrain", problems)]
        elif isinstance(problems, ProfileProblem):
            problems = [problems]
        self.problems: list[ProfileProblem] = list(problems)
        super().__init__("\n".join(p.line() for p in self.problems))

    def lines(self) -> list[str]:
        return [p.line() for p in self.problems]


class ProfileError(WantrainError):
    """The profile (TOML, --set overrides, plugin tables) is wrong."""


class PluginError(WantrainError):
    """A plugin cannot be resolved or implements an unknown event."""


class ModelError(WantrainError):
    """The model folder or hub id is missing or not a Wan 2.2 model."""


class DataError(WantrainError):
    """A dataset has no usable item, or its folder is missing."""
