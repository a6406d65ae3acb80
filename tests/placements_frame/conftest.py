"""The install suite's fixtures (a live app, an installed sandbox portal) for the frame tests;
one iframe form: what a page does in the frame does not depend on it."""

import pytest

from tests.install.conftest import *  # noqa: F403


@pytest.fixture
def form_kind() -> str:
    return "full"
