"""Brokers for the transport tests."""

from tests.fixtures.broker import any_broker, broker, embedded_broker  # noqa: F401
