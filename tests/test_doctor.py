"""The deployment doctor against real nginx (deploy/nginx.conf) in front of real gunicorn, and broken variants of it."""
import json
import subprocess

import pytest

import harness
from conftest import require_binary
from harness import ADMIN_TOKEN, PYTHON, ROOT, Server

# Each broken variant of deploy/nginx.conf, and the one check it must fail.
BROKEN = {
    "gzip on for event streams": ("gzip off;", "gzip on; gzip_types text/event-stream; gzip_min_length 1;", "headers"),
    "proxy buffering on": ("proxy_buffering off;", "proxy_buffering on; proxy_ignore_headers X-Accel-Buffering;",
                           "buffering"),
    "read timeout under the keepalive": ("proxy_read_timeout 60s;", "proxy_read_timeout 1s;", "silence"),
    "client aborts ignored": ("proxy_ignore_client_abort off;", "proxy_ignore_client_abort on;", "abort"),
}


@pytest.fixture(scope="module")
def relay_for_doctor(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("doctor"), workers=2, KEEPALIVE_SECONDS=2)
    yield server
    server.stop()


def doctor(url, *args, token=ADMIN_TOKEN, cacert=None):
    """Run `python -m doctor` as a user would; return (exit status, results by check name)."""
    command = [PYTHON, "-m", "doctor", url, "--token", token, "--json", *args]
    if cacert:
        command += ["--cacert", str(cacert)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, {r["check"]: r for r in json.loads(done.stdout)}


def nginx(tmp_path, server, swaps=()):
    return harness.Nginx(require_binary("nginx"), tmp_path, server, swaps=list(swaps))


def test_the_shipped_config_passes_every_check(relay_for_doctor, tmp_path):
    proxy = nginx(tmp_path, relay_for_doctor)
    try:
        status, results = doctor(f"https://localhost:{proxy.tls_port}", "--duration", "3",
                                 cacert=proxy.dir / "relay.crt")
        assert status == 0 and {r["status"] for r in results.values()} == {"PASS"}, results
        assert set(results) == {"access", "headers", "buffering", "first byte", "silence", "abort", "stop request",
                                "lease", "http/2", "duration"}
        status, results = doctor(f"http://127.0.0.1:{proxy.port}")
        assert status == 0 and results["http/2"]["status"] == "WARN"  # browsers speak HTTP/2 only over TLS
        assert all(r["status"] == "PASS" for name, r in results.items() if name != "http/2"), results
        # A table for people: one line per check, exit 0.
        table = subprocess.run([PYTHON, "-m", "doctor", f"http://127.0.0.1:{proxy.port}", "--token", ADMIN_TOKEN],
                               cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert table.returncode == 0 and table.stdout.count("PASS") == 8
    finally:
        proxy.stop()


@pytest.mark.parametrize("variant", list(BROKEN))
def test_each_broken_variant_fails_exactly_the_check_that_names_it(relay_for_doctor, tmp_path, variant):
    old, new, check = BROKEN[variant]
    proxy = nginx(tmp_path, relay_for_doctor, [(old, new)])
    try:
        status, results = doctor(f"https://localhost:{proxy.tls_port}", cacert=proxy.dir / "relay.crt")
        failed = {name for name, r in results.items() if r["status"] == "FAIL"}
        assert status == 1 and failed == {check}, results
        assert results[check]["fix"], "a failure says which setting to change"
        assert old.split()[0] in results[check]["fix"]  # it names the nginx setting
    finally:
        proxy.stop()


def test_a_wrong_token_is_one_clear_failure(relay_for_doctor):
    status, results = doctor(relay_for_doctor.url, token="wrong")
    assert status == 1 and list(results) == ["access"] and "--token" in results["access"]["fix"]
