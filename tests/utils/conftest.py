"""Fixtures for the object-storage tests: one moto S3 server per test module.

Each test module skips itself first (``pytest.importorskip("moto.server")``), so the fixture
only starts a server where moto is installed.
"""

from __future__ import annotations

import pytest
from s3_env import S3Server


@pytest.fixture(scope="module")
def s3():
    """A running :class:`s3_env.S3Server`, stopped when the module's tests are done."""
    server = S3Server()
    try:
        yield server
    finally:
        server.stop()
