"""Claims of `claims/appendix_g.yaml`, one test each (see claimcheck.py)."""

import pytest
from claimcheck import check, claim_ids


@pytest.mark.parametrize("claim_id", claim_ids("appendix_g"))
def test_claim(claim_id: str) -> None:
    check(claim_id)
