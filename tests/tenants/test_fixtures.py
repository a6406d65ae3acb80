"""The tenants fixtures build what they are asked for."""

from __future__ import annotations

import pytest

from app.tenants.models import PLAN_LIMITS
from tests.tenants.conftest import reload_portal


@pytest.mark.parametrize("plan", ["standard", "enterprise"])
def test_make_portal_stores_the_plan_asked_for(make_portal, sandbox, plan):
    portal, info = make_portal(plan=plan)
    stored = reload_portal(info["member_id"])
    assert stored.plan == plan == sandbox.portal(info["member_id"])["plan"]
    assert (stored.rate_per_second, stored.rate_burst) == PLAN_LIMITS[plan]
