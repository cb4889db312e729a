"""When `gptkit monitor` raises an alert: time windows, a z-score against a topic's trailing
baseline, and alert rules such as `negative>0.4 and n>=20`.

Pure functions and small frozen dataclasses, no I/O: the store (monitor_store.py) calls
`AlertPolicy.evaluate` once for each (topic, window) when the window closes.

Windows are aligned to a fixed origin, so the same item always lands in the same window
whatever came before it: hours, days and weeks are fixed lengths counted from the origin;
months and years are calendar spans starting on the first of a month (`4y` with origin
1789-03-01 gives 1789-03-01, 1793-03-01, ...: US presidential terms).
"""

from __future__ import annotations

import math
import operator
import re
import statistics
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta


class MonitorError(ValueError):
    """A user-facing monitor problem (bad flag value, unusable source or database)."""


FIXED = {"h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1)}
MONTHS = {"mo": 1, "y": 12}
UNIT_HELP = "h (hours), d (days), w (weeks), mo (months) or y (years)"
MIN_BASELINE = 3  # fewer past windows than this give no z-score: a mean of two is no baseline


def _add_months(t: datetime, months: int) -> datetime:
    index = t.year * 12 + (t.month - 1) + months
    year, month = divmod(index, 12)
    # Jan 31 + 1 month is Feb 28/29: the day is clamped to the month's length
    next_month = datetime(year + (month == 11), (month + 1) % 12 + 1, 1)
    last_day = (next_month - timedelta(days=1)).day
    return t.replace(year=year, month=month + 1, day=min(t.day, last_day))


@dataclass(frozen=True)
class Duration:
    """A span like `7d` or `4y`: window lengths and the allowed lateness."""

    count: int
    unit: str  # a key of FIXED or MONTHS; "" for the zero duration

    @classmethod
    def parse(cls, text: str, flag: str = "--window", zero_ok: bool = False) -> Duration:
        """`7d`, `4y`, ...; with zero_ok, also `0` (no lateness)."""
        match = re.fullmatch(r"\s*(\d+)\s*(h|d|w|mo|y)?\s*", str(text))
        count = int(match[1]) if match else -1
        if count == 0 and zero_ok:
            return cls(0, "")
        if count <= 0 or not match or not match[2]:
            raise MonitorError(
                f"{flag} {text!r}: give a positive whole number and a unit, "
                f"{UNIT_HELP}, e.g. 7d or 4y"
            )
        duration = cls(count, match[2])
        try:
            duration.add(datetime(2000, 1, 1))
        except (OverflowError, ValueError):
            raise MonitorError(f"{flag} {text!r} is longer than the calendar") from None
        return duration

    def __str__(self) -> str:
        return f"{self.count}{self.unit}"

    def add(self, t: datetime, times: int = 1) -> datetime:
        if not self.unit:
            return t
        if self.unit in FIXED:
            return t + FIXED[self.unit] * (self.count * times)
        return _add_months(t, MONTHS[self.unit] * self.count * times)

    def floor(self, t: datetime, origin: datetime) -> datetime:
        """The start of the window of this length (counted from `origin`) that holds `t`."""
        if self.unit in FIXED:
            return origin + ((t - origin) // (FIXED[self.unit] * self.count)) * (
                FIXED[self.unit] * self.count
            )
        months = (t.year - origin.year) * 12 + (t.month - origin.month)
        step = MONTHS[self.unit] * self.count
        return _add_months(origin, (months // step) * step)


def parse_origin(text: str, window: Duration) -> datetime:
    """--origin: the start of one window (and so of all of them)."""
    try:
        origin = datetime.fromisoformat(str(text))
    except ValueError:
        raise MonitorError(f"--origin {text!r} is not an ISO date like 1970-01-01") from None
    if origin.tzinfo is not None:  # every time is kept as naive UTC
        origin = origin.astimezone(UTC).replace(tzinfo=None)
    if window.unit in MONTHS and (origin.day, origin.time()) != (1, datetime.min.time()):
        raise MonitorError(
            f"--origin {text}: month and year windows start on the first of a month at "
            "midnight; give a date like 1789-03-01"
        )
    return origin


# -- rules -----------------------------------------------------------------------------------

NAMES = {"negative": "the window's negative share (0 to 1)", "n": "its items", "z": "its z-score"}
OPERATORS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


@dataclass(frozen=True)
class Condition:
    name: str  # negative, n or z
    op: str  # >, >=, <, <=
    value: float

    def holds(self, values: dict[str, float | None]) -> bool:
        have = values[self.name]
        return have is not None and OPERATORS[self.op](have, self.value)

    def __str__(self) -> str:
        return f"{self.name}{self.op}{self.value:g}"


@dataclass(frozen=True)
class Rule:
    """Conditions joined by `and`, each `NAME OP NUMBER`: parsed by hand, never eval'd."""

    text: str
    conditions: tuple[Condition, ...]

    @classmethod
    def parse(cls, text: str) -> Rule:
        if re.search(r"\b(or|not)\b", str(text), re.IGNORECASE):
            word = re.search(r"\b(or|not)\b", str(text), re.IGNORECASE)[0]
            raise MonitorError(
                f"--rule {str(text).strip()!r}: only 'and' joins conditions, not {word!r}"
            )
        parts = re.split(r"\band\b", str(text), flags=re.IGNORECASE)
        return cls(str(text).strip(), tuple(_condition(part, text) for part in parts))

    def holds(self, values: dict[str, float | None]) -> bool:
        return all(c.holds(values) for c in self.conditions)


def _condition(part: str, rule: str) -> Condition:
    where = f"--rule {rule.strip()!r}"
    part = part.strip()
    if not part:
        raise MonitorError(f"{where}: an empty condition (conditions are joined by 'and')")
    match = re.fullmatch(r"([A-Za-z_]\w*)\s*([<>=!]=?)?\s*(.*)", part)
    if not match:
        raise MonitorError(f"{where}: {part!r} does not start with a name ({', '.join(NAMES)})")
    name, op, number = match.groups()
    if name not in NAMES:
        raise MonitorError(f"{where}: unknown name {name!r}; use negative, n or z")
    if op not in OPERATORS:
        found = f"{op!r}" if op else "none"
        raise MonitorError(f"{where}: {part!r} needs one of >, >=, <, <= after {name}, not {found}")
    if not re.fullmatch(NUMBER, number.strip()):
        raise MonitorError(f"{where}: {part!r} must end in a number, not {number.strip()!r}")
    value = float(number)
    if name == "negative" and not 0 <= value <= 1:
        raise MonitorError(f"{where}: negative is a share from 0 to 1 (0.4 for 40%), not {value:g}")
    return Condition(name, op, value)


# -- evaluating a closed window ----------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """What the policy said about one closed window."""

    share: float
    mean: float | None  # the baseline: previous windows' negative shares
    std: float | None
    baseline_windows: int
    z: float | None
    reasons: tuple[str, ...]  # the alert kinds whose condition holds; empty: no condition

    @property
    def hit(self) -> bool:
        return bool(self.reasons)


@dataclass(frozen=True)
class AlertPolicy:
    """z: alert when the z-score reaches it (None: off). rule: alert when it holds (None:
    off). Either holding is a hit. baseline: how many past windows of the topic (with items)
    the mean and standard deviation come from. std_floor: the least std a z-score divides by,
    so a flat baseline (std 0) does not turn a tiny rise into an infinite z."""

    z: float | None = 3.0
    rule: Rule | None = None
    baseline: int = 8
    std_floor: float = 0.02

    def __post_init__(self):
        if self.z is None and self.rule is None:
            raise MonitorError("no alert condition: give --z, --rule or both")
        if self.baseline < MIN_BASELINE:
            raise MonitorError(f"--baseline must be at least {MIN_BASELINE}, got {self.baseline}")
        if not (self.std_floor > 0 and math.isfinite(self.std_floor)):
            raise MonitorError(f"the std floor must be positive, got {self.std_floor}")

    def evaluate(self, n: int, negatives: int, past_shares: list[float]) -> Verdict:
        """past_shares: the negative shares of the topic's previous windows, newest last (at
        most `baseline` of them)."""
        share = negatives / n
        mean = std = z = None
        if len(past_shares) >= MIN_BASELINE:
            mean, std = statistics.fmean(past_shares), statistics.stdev(past_shares)
            z = (share - mean) / max(std, self.std_floor)
        reasons = []
        if self.z is not None and z is not None and z >= self.z:
            reasons.append(f"z>={self.z:g}")
        if self.rule is not None and self.rule.holds({"negative": share, "n": n, "z": z}):
            reasons.append(self.rule.text)
        return Verdict(share, mean, std, len(past_shares), z, tuple(reasons))
