"""Claims of `claims/small_scale.yaml` (the cpu tier), one test each (see claimcheck.py).

Judged at ``TRADES_REPRO_TIER=cpu`` against ``TRADES_REPRO_RUNS=evidence/cpu`` (the committed
evidence, no weights); at any other tier they are skipped as not run.
"""

import pytest
from claimcheck import check, claim_ids


@pytest.mark.parametrize("claim_id", claim_ids("small_scale"))
def test_claim(claim_id: str) -> None:
    check(claim_id)
