"""Statistics of the study: mean ± std over seeds, and paired comparisons with a 95% t confidence interval.

Every cell of the study trains the same seeds (``0 .. seeds-1``) on the same feature store, and a cell's seed fixes
its initialisation and its batch order. Two cells that ran seed ``s`` therefore differ only in what the grid changes,
so the per-seed difference ``a_s − b_s`` removes the seed's own luck from the comparison. ``paired`` takes the mean of
those differences over the seeds both cells share and its Student-t interval::

    d̄ ± t_{0.975, n−1} · s_d / √n      (s_d: sample std of the n differences)

``Paired.status`` reads a claim "a > b" from it: *holds* when the whole interval is above 0, *does not hold* when it is
below 0, *inconclusive* otherwise, and always inconclusive with fewer than two shared seeds (no interval).
``best_of`` (the paper's value is the best of a sweep), ``beats_all`` (one cell beats each of several) and
``within`` (an equivalence claim: a cost stays below a margin) build on it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

from scipy import stats as scipy_stats

CONFIDENCE = 0.95
HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"


@dataclass
class Stat:
    mean: float
    std: float | None  # None for a single value
    n: int

    def format(self, digits: int = 1) -> str:
        if self.std is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def stat(values: Sequence[float]) -> Stat | None:
    """Mean and sample std (None for one value) of the finite ``values``; None when there are none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None
    return Stat(statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else None, len(finite))


@dataclass(frozen=True)
class Paired:
    """The paired difference ``a − b`` over the seeds both sides ran.

    Attributes:
        mean: mean per-seed difference; None without a shared seed.
        half_width: half-width of its 95% t interval; None with fewer than two shared seeds.
        seeds: the shared seeds the difference was taken over.
    """

    mean: float | None
    half_width: float | None
    seeds: tuple[int, ...]

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width

    @property
    def status(self) -> str:
        """The claim ``a > b``: holds / does not hold when the interval excludes 0 on that / the other side."""
        if self.half_width is None:
            return INCONCLUSIVE
        if self.low > 0:
            return HOLDS
        if self.high < 0:
            return FAILS
        return INCONCLUSIVE

    def format(self, digits: int = 1) -> str:
        """``Δ +3.2 ± 1.1 (95% CI, 3 seeds)``; ``Δ +3.2 (one seed: no CI)``; ``no shared seed``."""
        if self.mean is None:
            return "no shared seed"
        if self.half_width is None:
            return f"Δ {self.mean:+.{digits}f} (one seed: no CI)"
        return f"Δ {self.mean:+.{digits}f} ± {self.half_width:.{digits}f} ({CONFIDENCE:.0%} CI, {self.n} seeds)"


def paired(a: Mapping[int, float], b: Mapping[int, float]) -> Paired:
    """``a − b`` paired by seed (``{seed: value}`` each) over the seeds where both are finite.

    The interval is ``mean ± t.ppf(0.975, n − 1) · stdev / √n`` (scipy's Student t); identical differences give a
    zero-width interval.
    """
    seeds = tuple(sorted(s for s in set(a) & set(b) if math.isfinite(a[s]) and math.isfinite(b[s])))
    diffs = [a[s] - b[s] for s in seeds]
    if not diffs:
        return Paired(None, None, ())
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return Paired(mean, None, seeds)
    sem = statistics.stdev(diffs) / math.sqrt(len(diffs))
    return Paired(mean, float(scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, len(diffs) - 1)) * sem, seeds)


@dataclass(frozen=True)
class Judgement:
    """A claim's status and the comparisons it was read from (``(label, Paired)``, the deciding one first)."""

    status: str
    comparisons: tuple[tuple[str, Paired], ...]

    @property
    def deciding(self) -> Paired | None:
        return self.comparisons[0][1] if self.comparisons else None


def _mean(values: Mapping[int, float]) -> float:
    finite = [v for v in values.values() if math.isfinite(v)]
    return statistics.fmean(finite) if finite else -math.inf


def beats_all(ref: Mapping[int, float], rivals: Mapping[str, Mapping[int, float]]) -> Judgement:
    """Claim "``ref`` beats every rival": holds when every paired ``ref − rival`` interval is above 0, does not hold
    when any is below 0, else inconclusive. The deciding comparison is the rival with the lowest bound (the closest)."""
    comparisons = [(name, paired(ref, values)) for name, values in rivals.items()]

    def closeness(item: tuple[str, Paired]) -> float:
        p = item[1]
        return -math.inf if p.mean is None else (p.low if p.low is not None else p.mean)

    comparisons.sort(key=closeness)
    statuses = {p.status for _, p in comparisons}
    if FAILS in statuses:
        comparisons.sort(key=lambda item: item[1].status != FAILS)  # a refuting comparison decides
        status = FAILS
    elif comparisons and statuses == {HOLDS}:
        status = HOLDS
    else:
        status = INCONCLUSIVE
    return Judgement(status, tuple(comparisons))


def best_of(values: Mapping[Hashable, Mapping[int, float]], claimed: Hashable) -> Judgement:
    """Claim "``claimed`` is the best of ``values``" (``{point: {seed: value}}``), judged against the runner-up.

    Holds when ``claimed`` has the highest mean and its paired interval against the runner-up (the next mean) is
    above 0; does not hold when some other point beats it with a paired interval above 0; else inconclusive. The
    deciding comparison is ``claimed −`` the runner-up (or ``−`` the top point when ``claimed`` is not the top).
    """
    ranked = sorted(values, key=lambda k: _mean(values[k]), reverse=True)
    others = [k for k in ranked if k != claimed]
    if claimed not in values or not others:
        return Judgement(INCONCLUSIVE, ())
    beaten_by = [k for k in others if paired(values[k], values[claimed]).status == HOLDS]
    top_other = others[0]
    deciding = paired(values[claimed], values[top_other])
    comparisons = [(str(top_other), deciding)]
    if beaten_by:
        status = FAILS
        if beaten_by[0] != top_other:
            comparisons.insert(0, (str(beaten_by[0]), paired(values[claimed], values[beaten_by[0]])))
    elif ranked[0] == claimed and deciding.status == HOLDS:
        status = HOLDS
    else:
        status = INCONCLUSIVE
    return Judgement(status, tuple(comparisons))


def within(ref: Mapping[int, float], others: Mapping[str, Mapping[int, float]], margin: float | None) -> Judgement:
    """Claim "each of ``others`` costs less than ``margin`` against ``ref``" (an equivalence claim).

    The cost of ``other`` is the paired ``ref − other``. Holds when every cost's interval lies below ``margin``, does
    not hold when some cost's interval lies above it, else inconclusive (and always without a margin or with fewer
    than two shared seeds). The deciding comparison is the cost whose interval reaches highest (the one above the
    margin when the claim fails).
    """
    comparisons = sorted(
        ((name, paired(ref, values)) for name, values in others.items()),
        key=lambda item: -math.inf if item[1].mean is None else -(item[1].high or item[1].mean),
    )
    if margin is None or not comparisons or any(p.half_width is None for _, p in comparisons):
        return Judgement(INCONCLUSIVE, tuple(comparisons))
    if any(p.low > margin for _, p in comparisons):
        comparisons.sort(key=lambda item: -item[1].low)
        return Judgement(FAILS, tuple(comparisons))
    if all(p.high < margin for _, p in comparisons):
        return Judgement(HOLDS, tuple(comparisons))
    return Judgement(INCONCLUSIVE, tuple(comparisons))
