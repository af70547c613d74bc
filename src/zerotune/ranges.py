"""Valid ranges of numbers, written in interval notation ("[0, 1)", "[1, inf)") where they are declared: in the
config schema's field metadata and on the other commands' flags. One check, one wording for every source."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

from zerotune.errors import ConfigError

_INTERVAL = re.compile(r"([\[(])\s*(-?inf|-?[0-9.e+-]+)\s*,\s*(-?inf|-?[0-9.e+-]+)\s*([\])])")


@dataclass(frozen=True)
class Interval:
    """A closed, open or half-open range of numbers; an infinite end is always open."""

    low: float
    high: float
    low_closed: bool
    high_closed: bool

    @classmethod
    def parse(cls, text: str) -> "Interval":
        match = _INTERVAL.fullmatch(text.strip())
        if not match:
            raise ValueError(f"not an interval: {text!r} (write e.g. '[0, 1)' or '(0, inf)')")
        opening, low, high, closing = match.groups()
        return cls(float(low), float(high), opening == "[" and math.isfinite(float(low)),
                   closing == "]" and math.isfinite(float(high)))

    def __contains__(self, value: float) -> bool:
        above = value >= self.low if self.low_closed else value > self.low
        below = value <= self.high if self.high_closed else value < self.high
        return above and below

    def __str__(self) -> str:
        return (f"{'[' if self.low_closed else '('}{_number(self.low)}, "
                f"{_number(self.high)}{']' if self.high_closed else ')'}")

    def describe(self) -> str:
        """'at least 1', '0 or more', 'more than 0' or 'in [0, 1)': the words of an error message."""
        if math.isinf(self.high) and self.low_closed:
            return "0 or more" if self.low == 0 else f"at least {_number(self.low)}"
        if math.isinf(self.high):
            return f"more than {_number(self.low)}"
        return f"in {self}"

    def problem(self, value: float) -> str | None:
        """What is wrong with ``value`` ("must be at least 1, got 0"; NaN and infinities never fit), or None."""
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number {self.describe()}, got {_number(value) if math.isinf(value) else 'nan'}"
        if value not in self:
            return f"must be {self.describe()}, got {_number(value)}"
        return None


def _number(value: float) -> str:
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return str(int(value)) if float(value).is_integer() else repr(value)


def checked_number(kind: type, valid: str, flag: str) -> Callable[[str], float]:
    """An argparse ``type`` for ``flag``: converts with ``kind`` (int or float) and checks the range. Raises
    ConfigError (one line, exit status 2 through the CLI), not argparse's usage text."""
    interval = Interval.parse(valid)

    def convert(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise ConfigError(f"{flag}: expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        problem = interval.problem(value)
        if problem:
            raise ConfigError(f"{flag}: {problem}")
        return value

    convert.__name__ = kind.__name__  # argparse names the type in its own messages
    return convert
