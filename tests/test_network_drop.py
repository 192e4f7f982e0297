"""A client whose network silently vanishes (no FIN, no RST) still stops the model within seconds.

The client runs in a network namespace of its own behind a veth pair; the test takes its
link down mid-stream, so the relay's packets go nowhere. Only the dead-peer timers set on
the client socket (TCP keepalive, TCP_USER_TIMEOUT) can notice.
"""
import json
import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from harness import Server, scenario

NS = f"relaydrop{os.getpid() % 100000}"
HOST, PEER = "10.213.7.1", "10.213.7.2"  # the test's own two hosts, inside this machine

CLIENT = r"""
import json, socket, sys
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])))
body = sys.argv[3].encode()
sock.sendall(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
seen = b""
while seen.count(b"event: delta") < 3:
    seen += sock.recv(65536)
gen = seen.split(b'"id": "', 1)[1].split(b'"', 1)[0].decode()
print(gen, flush=True)
sys.stdin.read()  # hold the socket open until the test is done
"""


def ip(*args, ns=None):
    cmd = ["ip", "netns", "exec", ns, "ip", *args] if ns else ["ip", *args]
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.fixture
def namespace():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        if os.environ.get("REQUIRE_E2E") == "1":
            pytest.fail("the silent-drop test needs root and iproute2 (ip) under REQUIRE_E2E=1")
        pytest.skip("needs root and iproute2 to make a network namespace")
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    subprocess.run(["ip", "link", "del", f"{NS}a"], capture_output=True)
    ip("netns", "add", NS)
    try:
        ip("link", "add", f"{NS}a", "type", "veth", "peer", "name", f"{NS}b")
        ip("link", "set", f"{NS}b", "netns", NS)
        ip("addr", "add", f"{HOST}/30", "dev", f"{NS}a")
        ip("link", "set", f"{NS}a", "up")
        ip("addr", "add", f"{PEER}/30", "dev", f"{NS}b", ns=NS)
        ip("link", "set", f"{NS}b", "up", ns=NS)
        yield NS
    finally:
        subprocess.run(["ip", "link", "del", f"{NS}a"], capture_output=True)
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)


@pytest.mark.parametrize("phase", ["tokens flowing", "silent upstream"])
def test_a_silently_vanished_client_stops_the_model_within_seconds(namespace, upstream, tmp_path, phase):
    server = Server(tmp_path, host=HOST, LLM_PROVIDER="openai", LLM_BASE_URL=upstream.url + "/v1", LLM_MODEL="m")
    tag = uuid.uuid4().hex[:12]
    kw = {"tokens": 100000, "interval": 0.05} if phase == "tokens flowing" else {"tokens": 10, "silence_after": 3, "silence": 120}
    client = subprocess.Popen(["ip", "netns", "exec", namespace, sys.executable, "-c", CLIENT, HOST, str(server.port),
                               json.dumps(scenario(tag=tag, **kw))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        gen_id = client.stdout.readline().strip()
        assert gen_id.startswith("gen_")
        ip("link", "set", f"{namespace}b", "down", ns=namespace)  # the cable is cut: no FIN, no RST
        dropped = time.monotonic()
        rec = upstream.wait_closed(tag, timeout=30)
        assert rec["closed_at"] is not None, "the relay still holds the upstream 30 s after the client vanished"
        assert rec["closed_at"] - dropped < 20
        gen = server.wait_finished(gen_id)
        assert gen["status"] == "cancelled" and gen["cancel_reason"] == "client_disconnect"
    finally:
        client.kill()
        client.wait()
        server.stop()


def test_a_browser_vanishing_behind_nginx_is_stopped_by_its_lapsed_lease(namespace, upstream, tmp_path):
    """nginx keeps taking the relay's writes for a client that is gone: only the lease can tell."""
    from conftest import require_binary
    from harness import Nginx
    server = Server(tmp_path, LLM_PROVIDER="openai", LLM_BASE_URL=upstream.url + "/v1", LLM_MODEL="m")
    proxy = Nginx(require_binary("nginx"), tmp_path, server, also_listen=HOST)
    tag = uuid.uuid4().hex[:12]
    lease = 2
    body = {"lease_seconds": lease, **scenario(tag=tag, tokens=100000, interval=0.05)}
    began = time.monotonic()
    client = subprocess.Popen(["ip", "netns", "exec", namespace, sys.executable, "-c", CLIENT, HOST, str(proxy.port),
                               json.dumps(body)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        gen_id = client.stdout.readline().strip()
        assert gen_id.startswith("gen_")
        ip("link", "set", f"{namespace}b", "down", ns=namespace)  # the cable is cut, and never renews
        rec = upstream.wait_closed(tag, timeout=15)
        assert rec["closed_at"] is not None, "the relay still holds the upstream 15 s after the client vanished"
        # The lease was set when the chat started, its last (only) renewal.
        assert rec["closed_at"] - began < lease + 2
        gen = server.wait_finished(gen_id)
        assert gen["status"] == "cancelled" and gen["cancel_reason"] == "lease_expired"
    finally:
        client.kill()
        client.wait()
        proxy.stop()
        server.stop()
