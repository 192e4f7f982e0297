"""pytest fixtures over the real processes of harness.py."""
import os
import shutil

import pytest

from harness import Server, Upstream


def require_binary(name):
    """Return the binary's path; skip without it, fail under REQUIRE_E2E=1 (CI)."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (Debian package {name})"
        if os.environ.get("REQUIRE_E2E") == "1":
            pytest.fail(message + " and REQUIRE_E2E=1")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def upstream():
    up = Upstream()
    yield up
    up.stop()


@pytest.fixture(scope="module")
def relay(upstream, tmp_path_factory):
    """gunicorn relaying to the fake provider (OpenAI format), short keepalive and timeouts."""
    server = Server(tmp_path_factory.mktemp("relay"), LLM_PROVIDER="openai", LLM_BASE_URL=upstream.url + "/v1",
                    LLM_MODEL="gpt-test", LLM_API_KEY="sk-test-SECRET-KEY", KEEPALIVE_SECONDS=0.5,
                    UPSTREAM_CONNECT_TIMEOUT=1, UPSTREAM_READ_TIMEOUT=3)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    """gunicorn with the embedded demo model (two workers, as deployed)."""
    server = Server(tmp_path_factory.mktemp("demo"), workers=2, KEEPALIVE_SECONDS=0.5, DEMO_TOKENS_PER_SECOND=50)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres():
    """A real Postgres for the whole session; skip without it, fail under REQUIRE_E2E=1 (CI)."""
    from harness import Postgres, postgres_bindir
    bindir = postgres_bindir()
    if bindir is None:
        message = "Postgres is not installed (Debian package postgresql)"
        if os.environ.get("REQUIRE_E2E") == "1":
            pytest.fail(message + " and REQUIRE_E2E=1")
        pytest.skip(message)
    pg = Postgres(bindir)
    yield pg
    pg.destroy()
