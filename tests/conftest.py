"""Shared fixtures. The real vLLM engine starts at most once per test session, and only when a
selected test asks for it (`-m "not engine"` never starts it)."""

from __future__ import annotations

import os

import pytest

# Prefect's ephemeral server logs "Stopping temporary server" at exit, after pytest has closed the
# captured streams ("--- Logging error ---"); the CLI runs at WARNING too (flows.cli).
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_LOGGING_SERVER_LEVEL", "WARNING")
# Tests that run recipes in-process start Prefect's ephemeral server: 20 s is too short on a busy box.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network here
os.environ.setdefault("DO_NOT_TRACK", "1")


def pytest_collection_modifyitems(config, items):
    # A test that uses the engine fixture is an engine test, marked or not, so `-m "not engine"`
    # deselects it instead of silently starting vLLM.
    for item in items:
        if "engine" in getattr(item, "fixturenames", ()) and item.get_closest_marker("engine") is None:
            item.add_marker(pytest.mark.engine)


@pytest.fixture(scope="session")
def engine():
    """The process-cached VLLMEngine on the embedded SmolLM2 model; shut down after the session."""
    from engines import get_engine, shutdown_all

    eng = get_engine()  # no options: the same cached engine a test or stage gets from get_engine()
    try:
        yield eng
    finally:
        shutdown_all()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` (tests/servers.py), once per session; stopped at the end."""
    from tests.servers import prefect_server as start_server

    with start_server(tmp_path_factory.mktemp("prefect-home")) as server:
        yield server
