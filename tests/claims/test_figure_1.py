"""Claims of `claims/figure_1.yaml`, one test each (see claimcheck.py)."""

import pytest
from claimcheck import check, claim_ids


@pytest.mark.parametrize("claim_id", claim_ids("figure_1"))
def test_claim(claim_id: str) -> None:
    check(claim_id)
