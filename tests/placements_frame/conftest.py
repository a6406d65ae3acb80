"""The install suite's fixtures (a live app, an installed sandbox portal) for the frame tests."""

from tests.install.conftest import *  # noqa: F403
