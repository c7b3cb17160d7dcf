"""Checkpoint-selection policies, named because the paper uses two and they can disagree.

* `best_pgd10` (App. B): the epoch with the highest validation PGD-10 accuracy;
* `best_pgd10_fosc_ok` (Algorithm 1, lines 17-18): the highest PGD-10 accuracy among epochs
  whose validation FOSC is at most the threshold.

Ties keep the earlier epoch (strict improvement, as Algorithm 1's `>`). Algorithm 1 starts
from `best_adv_acc = 0`, so an epoch with 0 PGD-10 accuracy is never selected there; we
start from −∞ so that every run has a checkpoint for each policy it can evaluate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

Policy = Literal["best_pgd10", "best_pgd10_fosc_ok"]
POLICIES: tuple[Policy, ...] = ("best_pgd10", "best_pgd10_fosc_ok")


@dataclass
class PolicyState:
    """Best validation PGD-10 so far, and its epoch, for each policy."""

    best: dict[str, float] = field(default_factory=dict)
    best_epoch: dict[str, int | None] = field(default_factory=lambda: dict.fromkeys(POLICIES))


def eligible(policy: Policy, fosc: float | None, threshold: float) -> bool:
    """Whether an epoch may be chosen by `policy` at all."""
    if policy == "best_pgd10":
        return True
    return fosc is not None and fosc <= threshold


def update_policies(state: PolicyState, epoch: int, val: dict, threshold: float) -> dict[str, bool]:
    """Fold one validated epoch into `state`; return the record's policy fields."""
    acc, fosc = val["val_pgd10_acc"], val["val_fosc"]
    fields: dict = {"fosc_ok": None if fosc is None else fosc <= threshold}
    for policy in POLICIES:
        improved = eligible(policy, fosc, threshold) and acc > state.best.get(policy, -math.inf)
        if improved:
            state.best[policy] = acc
            state.best_epoch[policy] = epoch
        fields[policy] = improved
    return fields


def select_checkpoints(records: Iterable[dict], threshold: float) -> dict[Policy, int | None]:
    """Each policy's chosen epoch over a whole metrics series (None: nothing eligible)."""
    state = PolicyState()
    for record in records:
        update_policies(state, record["epoch"], record, threshold)
    return dict(state.best_epoch)  # type: ignore[return-value]
