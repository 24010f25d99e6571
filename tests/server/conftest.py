"""Fixtures for the server tests: an ApiServer over the fake engine, on a free port."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fake_engine import FakeEngine  # noqa: E402

from mlxdist.server.app import ApiServer  # noqa: E402


@pytest.fixture
def make_server():
    servers = []

    def make(engine=None, **kw) -> ApiServer:
        server = ApiServer(engine or FakeEngine(), "127.0.0.1", 0, quiet=True, **kw).start()
        servers.append(server)
        return server

    yield make
    for s in servers:
        s.shutdown()


@pytest.fixture
def server(make_server) -> ApiServer:
    return make_server()
