"""A blocked portal's settings page says why nothing is sent; once the block is lifted, the
admin's next open resumes it."""

from __future__ import annotations

import pytest

from tests.install.conftest import (  # noqa: F401 - fixtures
    installed,
    live_app,
    make_portal,
    portal_row,
)


@pytest.fixture
def form_kind() -> str:
    """The iframe form makes no difference here: one form is enough."""
    return "short"


def test_the_admin_sees_the_block_and_reopening_after_it_is_lifted_resumes(
        sandbox, installed):  # noqa: F811
    mid = installed["member_id"]
    sandbox.set_fault(mid, "overload_limit")  # Bitrix24 support blocked the app's REST

    page = sandbox.open_placement(mid)  # user.admin, the open's one REST call, is refused
    assert page["status"] == 200
    assert 'data-status="blocked"' in page["body"] and "Bitrix24 support" in page["body"]
    assert 'name="form_token"' not in page["body"]  # read-only while blocked
    row = portal_row(mid)
    assert row.status == "blocked" and "OVERLOAD_LIMIT" in row.status_reason

    sandbox.clear_faults(mid)  # lifted: the admin's next open shows REST answers again
    page = sandbox.open_placement(mid)
    assert "The app is connected again." in page["body"]
    assert 'data-status="active"' in page["body"] and 'name="form_token"' in page["body"]
    assert portal_row(mid).status == "active"
