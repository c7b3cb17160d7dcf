"""Predicates over one run's epoch series (Figs. 2, 3, 5, 6, 7 and Sec. 5.3).

Each takes the per-epoch values a run recorded in `metrics.jsonl` and returns an
`EventResult`: whether the event happened, and the numbers behind the answer. They are pure
functions of lists, so the tests feed them series written by hand.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class EventResult:
    happened: bool
    detail: str
    epoch: int | None = None  # the epoch the event is anchored at (1-based), if any


def spikes(fosc: Sequence[float], threshold: float) -> list[tuple[int, int]]:
    """Maximal stretches of consecutive epochs with FOSC > threshold, as 0-based
    (first, last) index pairs."""
    stretches: list[tuple[int, int]] = []
    start = None
    for i, value in enumerate(fosc):
        if value > threshold and start is None:
            start = i
        if value <= threshold and start is not None:
            stretches.append((start, i - 1))
            start = None
    if start is not None:
        stretches.append((start, len(fosc) - 1))
    return stretches


def fosc_spike(fosc: Sequence[float], pgd10: Sequence[float], reference_median: float,
               *, ratio: float, pgd10_max_change: float) -> EventResult:
    """Fig. 2: peak FOSC ≥ ratio × the regular runs' median, while PGD-10 at the peak moved
    by at most `pgd10_max_change` from the epoch before."""
    peak = max(range(len(fosc)), key=fosc.__getitem__)
    factor = fosc[peak] / reference_median if reference_median > 0 else float("inf")
    change = abs(pgd10[peak] - pgd10[peak - 1]) if peak > 0 else 0.0
    happened = factor >= ratio and change <= pgd10_max_change
    return EventResult(happened, f"peak FOSC {fosc[peak]:.4g} = {factor:.1f}x the reference "
                       f"median {reference_median:.4g}; PGD-10 moved {change:.4f}", peak + 1)


def gap_drop_at_spike(fosc: Sequence[float], gap: Sequence[float], threshold: float,
                      *, min_drop: float, window: int) -> EventResult:
    """Fig. 3: when FOSC first passes the threshold, the train clean − TPGD gap falls by at
    least `min_drop` below its mean over the previous `window` epochs."""
    stretches = spikes(fosc, threshold)
    if not stretches:
        return EventResult(False, f"FOSC never above {threshold:g}")
    first = stretches[0][0]
    if first == 0:
        return EventResult(False, "FOSC above the threshold from the first epoch: no baseline")
    before = statistics.fmean(gap[max(0, first - window):first])
    drop = before - gap[first]
    return EventResult(drop >= min_drop, f"gap {gap[first]:.4f} at the first spike vs "
                       f"{before:.4f} before (drop {drop:.4f})", first + 1)


def self_healing(fosc: Sequence[float], threshold: float, *, within: int) -> EventResult:
    """Sec. 5.3: FOSC above the threshold, then back to ≤ threshold within `within` epochs
    (a stretch still open at the last epoch has not healed)."""
    for first, last in spikes(fosc, threshold):
        healed = last + 1 < len(fosc) and last - first + 1 <= within
        if healed:
            return EventResult(True, f"FOSC above {threshold:g} at epochs {first + 1}–"
                               f"{last + 1}, back below at {last + 2}", first + 1)
    n = len(spikes(fosc, threshold))
    return EventResult(False, f"{n} FOSC spike(s) above {threshold:g}, none healed within "
                       f"{within} epoch(s)")


def spike_duration_at_most(fosc: Sequence[float], threshold: float,
                           *, max_epochs: int) -> EventResult:
    """Fig. 6: every stretch of FOSC above the threshold lasts at most `max_epochs`."""
    stretches = spikes(fosc, threshold)
    longest = max((last - first + 1 for first, last in stretches), default=0)
    return EventResult(longest <= max_epochs, f"{len(stretches)} spike(s) above "
                       f"{threshold:g}, the longest {longest} epoch(s)")
