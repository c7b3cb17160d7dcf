"""Predicates over one run's epoch series (Figs. 2, 3, 5, 6, 7 and Sec. 5.3).

Each takes the per-epoch values a run recorded in `metrics.jsonl` and returns an
`EventResult`: whether the event happened, and the numbers behind the answer. They are pure
functions of lists, so the tests feed them series written by hand.

A FOSC spike is a *rise*: FOSC above the threshold after an epoch at or below it, as at
Fig. 3's epoch 102 ("FOSC starts to rise sharply"). A stretch above the threshold from the
first epoch on is the start of training, not instability, so it is never a spike: counted as
one it would make Fig. 6's one-epoch spikes fail, make a decaying start pass as Fig. 5's
self-healing and put Fig. 3's and Fig. 4's onset at epoch 1 (in the Fashion-MNIST evidence
FOSC often peaks at epoch 1). Likewise Fig. 2's peak is taken from the second epoch on,
where PGD-10's change from the epoch before is defined.
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
    """Maximal stretches of consecutive epochs with FOSC > threshold that follow an epoch
    with FOSC ≤ threshold (a rise), as 0-based (first, last) index pairs."""
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
    return [(first, last) for first, last in stretches if first > 0]


def fosc_spike(fosc: Sequence[float], pgd10: Sequence[float], reference_median: float,
               *, ratio: float, pgd10_max_change: float) -> EventResult:
    """Fig. 2: peak FOSC from the second epoch on ≥ ratio × the regular runs' median, while
    PGD-10 at the peak moved by at most `pgd10_max_change` from the epoch before."""
    if len(fosc) < 2:
        return EventResult(False, f"{len(fosc)} epoch(s): no change to judge")
    peak = max(range(1, len(fosc)), key=fosc.__getitem__)
    factor = fosc[peak] / reference_median if reference_median > 0 else float("inf")
    change = abs(pgd10[peak] - pgd10[peak - 1])
    happened = factor >= ratio and change <= pgd10_max_change
    return EventResult(happened, f"peak FOSC {fosc[peak]:.4g} = {factor:.1f}x the reference "
                       f"median {reference_median:.4g}; PGD-10 moved {change:.4f}", peak + 1)


def gap_drop_at_spike(fosc: Sequence[float], gap: Sequence[float], threshold: float,
                      *, min_drop: float, window: int) -> EventResult:
    """Fig. 3: when FOSC first passes the threshold, the train clean − TPGD gap falls by at
    least `min_drop` below its mean over the previous `window` epochs."""
    epoch = first_spike_epoch(fosc, threshold)
    if epoch is None:
        return EventResult(False, f"FOSC never rises above {threshold:g}")
    first = epoch - 1  # 0-based, ≥ 1: a spike follows an epoch at or below the threshold
    before = statistics.fmean(gap[max(0, first - window):first])
    drop = before - gap[first]
    return EventResult(drop >= min_drop, f"gap {gap[first]:.4f} at the first spike vs "
                       f"{before:.4f} before (drop {drop:.4f})", first + 1)


def gap_negative_after_spike(fosc: Sequence[float], gap: Sequence[float],
                             threshold: float) -> EventResult:
    """§5.1: from FOSC's first rise above the threshold on, the train gap is below 0 in some
    epoch."""
    epoch = first_spike_epoch(fosc, threshold)
    if epoch is None:
        return EventResult(False, f"FOSC never rises above {threshold:g}")
    low = min(range(epoch - 1, len(gap)), key=gap.__getitem__)
    return EventResult(gap[low] < 0, f"lowest gap {gap[low]:.4f} at epoch {low + 1}, from "
                       f"the first spike at {epoch} on", low + 1)


def healed_spikes(fosc: Sequence[float], threshold: float,
                  within: int) -> list[tuple[int, int]]:
    """The spikes (0-based first, last) that end within `within` epochs and before the last
    epoch: FOSC is back at or below the threshold at index last + 1."""
    return [(first, last) for first, last in spikes(fosc, threshold)
            if last + 1 < len(fosc) and last - first + 1 <= within]


def self_healing(fosc: Sequence[float], threshold: float, *, within: int) -> EventResult:
    """Sec. 5.3: FOSC above the threshold, then back to ≤ threshold within `within` epochs
    (a stretch still open at the last epoch has not healed)."""
    for first, last in healed_spikes(fosc, threshold, within):
        return EventResult(True, f"FOSC above {threshold:g} at epochs {first + 1}–"
                           f"{last + 1}, back below at {last + 2}", first + 1)
    n = len(spikes(fosc, threshold))
    return EventResult(False, f"{n} FOSC spike(s) above {threshold:g}, none healed within "
                       f"{within} epoch(s)")


def spike_duration_at_least(fosc: Sequence[float], threshold: float,
                            *, min_epochs: int) -> EventResult:
    """Fig. 6's unstable baseline: some spike of FOSC above the threshold lasts at least
    `min_epochs` (a spike still open at the last epoch counts the epochs it has)."""
    first, longest, detail = _longest_spike(fosc, threshold)
    return EventResult(longest >= min_epochs, detail, None if first is None else first + 1)


def spike_duration_at_most(fosc: Sequence[float], threshold: float,
                           *, max_epochs: int) -> EventResult:
    """Fig. 6: every spike of FOSC above the threshold lasts at most `max_epochs`. A run
    without a spike shows nothing here: the judge counts only runs with one."""
    _, longest, detail = _longest_spike(fosc, threshold)
    return EventResult(longest <= max_epochs, detail)


def _longest_spike(fosc: Sequence[float], threshold: float) -> tuple[int | None, int, str]:
    """The longest spike's first index (None without one), its length, and the detail."""
    stretches = spikes(fosc, threshold)
    first, last = max(stretches, key=lambda s: s[1] - s[0], default=(None, -1))
    longest = 0 if first is None else last - first + 1
    return first, longest, (f"{len(stretches)} spike(s) above {threshold:g}, the longest "
                            f"{longest} epoch(s)")


def sgcs_falls_with_fosc(fosc: Sequence[float], sgcs: Sequence[float], *,
                         within_epochs: int) -> EventResult:
    """Fig. 2: SGCS's largest one-epoch fall comes within `within_epochs` of FOSC's largest
    one-epoch rise (both from the second epoch on; the first change is epoch 2's)."""
    if len(fosc) < 2:
        return EventResult(False, f"{len(fosc)} epoch(s): no change to judge")
    rise = max(range(1, len(fosc)), key=lambda i: fosc[i] - fosc[i - 1])
    fall = max(range(1, len(sgcs)), key=lambda i: sgcs[i - 1] - sgcs[i])
    return EventResult(abs(rise - fall) <= within_epochs,
                       f"FOSC's sharpest rise at epoch {rise + 1} ({fosc[rise - 1]:.4g} → "
                       f"{fosc[rise]:.4g}), SGCS's sharpest fall at epoch {fall + 1} "
                       f"({sgcs[fall - 1]:.4g} → {sgcs[fall]:.4g})", rise + 1)


def square_lowest(square: float, white_box: dict[str, float], *, margin: float) -> EventResult:
    """Table 1 / §4.1: Square's accuracy is at least `margin` below every white-box attack's."""
    name, lowest = min(white_box.items(), key=lambda item: item[1])
    return EventResult(square <= lowest - margin, f"Square {square:.4f}, lowest white-box "
                       f"{name} {lowest:.4f} (margin {lowest - square:+.4f})")


def healing_signature(fosc: Sequence[float], clean: Sequence[float],
                      w_grad_norm: Sequence[float], threshold: float, *, within: int,
                      near_zero: float) -> EventResult:
    """§5.3 / Fig. 5, at each healed spike: in the epoch FOSC falls back, clean training
    accuracy dips and FOSC is at most `near_zero` × threshold; in the next epoch the mean
    W_grad_norm is lower than in that one. Happened if one healed spike shows all three."""
    notes = []
    for _, last in healed_spikes(fosc, threshold, within):
        h = last + 1  # the epoch FOSC fell back (0-based)
        if h + 1 >= len(fosc):
            notes.append(f"healed at the last epoch ({h + 1}): no next epoch to compare")
            continue
        dip, low = clean[h] < clean[h - 1], fosc[h] <= near_zero * threshold
        drop = w_grad_norm[h + 1] < w_grad_norm[h]
        notes.append(f"healed at epoch {h + 1}: clean {clean[h - 1]:.4f} → {clean[h]:.4f}, "
                     f"FOSC {fosc[h]:.4g} (near zero: ≤ {near_zero * threshold:.4g}), "
                     f"W_grad_norm {w_grad_norm[h]:.4g} → {w_grad_norm[h + 1]:.4g}")
        if dip and low and drop:
            return EventResult(True, notes[-1], h + 1)
    return EventResult(False, "; ".join(notes) or f"no FOSC spike above {threshold:g} healed "
                       f"within {within} epoch(s)")


def first_spike_epoch(fosc: Sequence[float], threshold: float) -> int | None:
    """The first epoch (1-based) with FOSC above the threshold; None if there is none."""
    stretches = spikes(fosc, threshold)
    return stretches[0][0] + 1 if stretches else None


def kl_with_w(w_grad_norm: Sequence[float], kl_norm: Sequence[float],
              ce_norm: Sequence[float], *, min_rho: float) -> EventResult:
    """Fig. 4 / §5.2 over one epoch's steps: W_grad_norm's spikes are KL_norm's, not
    CE_norm's: W_grad_norm ranks with KL_norm (Spearman ρ ≥ `min_rho`) more than with
    CE_norm, the term the paper saw stay "relatively stable"."""
    if len(w_grad_norm) < 3:
        return EventResult(False, f"{len(w_grad_norm)} step(s): too few to rank")
    rho_kl, rho_ce = _rho(w_grad_norm, kl_norm), _rho(w_grad_norm, ce_norm)
    return EventResult(rho_kl >= min_rho and rho_ce < rho_kl,
                       f"ρ(W_grad_norm, KL_norm) {rho_kl:+.2f}, ρ(W_grad_norm, CE_norm) "
                       f"{rho_ce:+.2f} over {len(w_grad_norm)} steps")


def cosine_against_w(w_grad_norm: Sequence[float], cosine: Sequence[float],
                     *, min_rho: float) -> EventResult:
    """Fig. 4 / §5.2 over one epoch's steps: the gradient cosine before/after each step
    falls where W_grad_norm rises (Spearman ρ ≤ −`min_rho`)."""
    if len(w_grad_norm) < 3:
        return EventResult(False, f"{len(w_grad_norm)} step(s): too few to rank")
    rho = _rho(w_grad_norm, cosine)
    return EventResult(rho <= -min_rho, f"ρ(W_grad_norm, grad_cosine_similarity) {rho:+.2f} "
                       f"over {len(w_grad_norm)} steps")


def _rho(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's ρ; 0 where it is undefined (a constant series ranks nothing)."""
    from scipy.stats import spearmanr

    if len(set(a)) < 2 or len(set(b)) < 2:
        return 0.0
    return float(spearmanr(a, b).statistic)
