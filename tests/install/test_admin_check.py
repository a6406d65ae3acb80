"""The admin check (``user.admin``) answered with something that is not about the user.

A limit is "the portal is busy, try again"; PAYMENT_REQUIRED, NOT_INSTALLED and
PORTAL_DELETED describe the portal, which moves through the status machine
(app/tenants/status.py), and the page the admin opened says so.
"""

from __future__ import annotations

import pytest

from tests.install.conftest import portal_row

UNPAID = "The app&#39;s subscription on this portal has ended."


@pytest.fixture
def form_kind() -> str:
    """The iframe form makes no difference to the admin check: one form is enough."""
    return "full"


def test_an_unpaid_portal_says_so_when_the_admin_opens_the_app(sandbox, installed):
    mid = installed["member_id"]
    sandbox.set_subscription(mid, active=False)  # Bitrix24: PAYMENT_REQUIRED from REST

    page = sandbox.open_placement(mid)  # the installing admin
    assert page["status"] == 200
    assert 'data-status="payment_required"' in page["body"] and UNPAID in page["body"]
    assert 'name="form_token"' not in page["body"]  # read-only: nothing can be saved now
    row = portal_row(mid)
    assert row.status == "payment_required" and "PAYMENT_REQUIRED" in row.status_reason

    sandbox.set_subscription(mid, active=True)  # renewed: the admin's next open reconnects
    page = sandbox.open_placement(mid)
    assert "The app is connected again." in page["body"]
    assert 'data-status="active"' in page["body"] and 'name="form_token"' in page["body"]
    assert portal_row(mid).status == "active"


@pytest.mark.parametrize("fault, code", [("query_limit", "QUERY_LIMIT_EXCEEDED"),
                                         ("operation_time_limit", "OPERATION_TIME_LIMIT")])
def test_a_limit_on_the_admin_check_is_busy_not_a_no(sandbox, installed, fault, code):
    mid = installed["member_id"]
    sandbox.set_fault(mid, fault, count=1)  # user.admin is the open's one REST call
    page = sandbox.open_placement(mid)
    assert page["status"] == 503 and f"the portal is busy ({code}); try again" in page["body"]
    assert portal_row(mid).status == "active"
    again = sandbox.open_placement(mid)
    assert again["status"] == 200 and 'name="form_token"' in again["body"]  # still the admin
