"""Fixtures shared with the app tests."""

from tests.app.conftest import composer  # noqa: F401
