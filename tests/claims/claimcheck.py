"""Shared by the per-artefact claim modules: one pytest test per claim, judged by `verify`.

Evidence comes from ``$TRADES_REPRO_RUNS`` (default ``runs``) at tier ``$TRADES_REPRO_TIER``
(default ``full``). A claim without evidence is a visible skip ("not run"), never a pass; a
failed claim fails with paper, ours, test and p-value in its message, except a statement
refuted by a pinned counterexample (`shows: counterexample`), which is an expected failure
(xfail) with the same message.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import pytest

from trades_repro.claims import Catalogue, load_catalogue
from trades_repro.verify import Context, Evidence, judge

ROOT = Path(__file__).resolve().parents[2]


@cache
def catalogue() -> Catalogue:
    return load_catalogue(ROOT / "claims")


@cache
def context() -> Context:
    runs = Path(os.environ.get("TRADES_REPRO_RUNS", ROOT / "runs"))
    return Context(catalogue(), Evidence(runs), os.environ.get("TRADES_REPRO_TIER", "full"))


def claim_ids(artefact: str) -> list[str]:
    return [e.id for e in catalogue().entries if e.artefact == artefact]


def check(claim_id: str) -> None:
    entry = catalogue().by_id[claim_id]
    judgement = judge(entry, context())
    if judgement.status == "failed" and getattr(entry.claim.test, "shows", "") == "counterexample":
        pytest.xfail(judgement.message())  # a statement of the paper that one case refutes
    if judgement.status == "failed":
        pytest.fail(judgement.message(), pytrace=False)
    if judgement.status != "held":
        pytest.skip(judgement.message())
