"""Through a real nginx started from deploy/nginx.conf: no buffering, aborts passed on, HTTP/2."""
import json
import socket
import ssl
import time
import uuid

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest

import harness
from conftest import require_binary
from harness import SSE as RawSSE, Server, scenario, texts

BROWSER_HEADERS = {"Accept-Encoding": "gzip, deflate, br, zstd", "Accept": "*/*"}


def SSE(port, body, **kw):
    """A stream request that asks for compression, as every browser does."""
    return RawSSE(port, body, headers=BROWSER_HEADERS, **kw)


def Nginx(tmp_path, server, read_timeout=None, h2c=False):
    """nginx from deploy/nginx.conf in front of `server`; fails under REQUIRE_E2E=1 without it."""
    return harness.Nginx(require_binary("nginx"), tmp_path, server, read_timeout, h2c)


def tag():
    return uuid.uuid4().hex[:12]


@pytest.fixture(scope="module")
def nginx(relay, tmp_path_factory):
    proxy = Nginx(tmp_path_factory.mktemp("nginx"), relay)
    yield proxy
    proxy.stop()


def test_events_are_not_buffered(nginx, upstream):
    """Each piece reaches the client within 50 ms of the fake upstream sending it."""
    s = SSE(nginx.port, scenario(tag=tag(), tokens=10, interval=0.1, text="{t}"))
    deltas = [e for e in s.read_all() if e[0] == "delta"]
    assert len(deltas) == 10
    delays = [arrived - float(data["text"]) for _, data, arrived in deltas]
    assert max(delays) < 0.05, delays


def test_demo_model_streams_unbuffered_through_nginx(demo_server, tmp_path):
    proxy = Nginx(tmp_path, demo_server)
    try:
        s = SSE(proxy.port, {"messages": [{"role": "user", "content": "/words 8 /rate 10"}]})
        deltas = [e for e in s.read_all() if e[0] == "delta"]
        assert len(deltas) == 8
        gaps = [b[2] - a[2] for a, b in zip(deltas, deltas[1:])]
        # 10 tokens/s: each arrives on its own, about 100 ms after the last, never in a batch.
        assert all(0.05 < gap < 0.15 for gap in gaps), gaps
    finally:
        proxy.stop()


@pytest.mark.parametrize("phase", ["flowing", "silent"])
def test_abort_through_nginx_closes_the_upstream(nginx, relay, upstream, phase):
    t = tag()
    kw = {"tokens": 1000, "interval": 0.02} if phase == "flowing" else {"tokens": 10, "silence_after": 2, "silence": 30}
    s = SSE(nginx.port, scenario(tag=t, **kw))
    events = s.read_until("delta", 2)
    time.sleep(0.1)
    closed = s.close()
    rec = upstream.wait_closed(t)
    assert rec["closed_at"] is not None and rec["closed_at"] - closed < 0.1, rec["closed_at"] and rec["closed_at"] - closed
    gen = relay.wait_finished(events[0][1]["id"])
    assert gen["status"] == "cancelled" and gen["cancel_reason"] == "client_disconnect"


def test_keepalive_comments_outlive_nginx_read_timeout(relay, upstream, tmp_path):
    """proxy_read_timeout 1s, KEEPALIVE_SECONDS=0.5: a 2.5 s silence survives."""
    proxy = Nginx(tmp_path, relay, read_timeout="1s")
    try:
        s = SSE(proxy.port, scenario(tag=tag(), tokens=4, silence_after=2, silence=2.5))
        events = s.read_all()
        assert events[-1][0] == "done" and texts(events) == "tok0 tok1 tok2 tok3 "
    finally:
        proxy.stop()


def test_without_keepalive_nginx_would_cut_the_silence(upstream, tmp_path):
    """The control for the test above: a relay keepalive longer than nginx's timeout loses the stream."""
    server = Server(tmp_path, LLM_PROVIDER="openai", LLM_BASE_URL=upstream.url + "/v1", LLM_MODEL="m", KEEPALIVE_SECONDS=10)
    proxy = Nginx(tmp_path, server, read_timeout="1s")
    try:
        s = SSE(proxy.port, scenario(tag=tag(), tokens=4, silence_after=2, silence=2.5))
        events = s.read_all()
        assert events[-1][0] == "delta" and "done" not in [e[0] for e in events]
    finally:
        proxy.stop()
        server.stop()


def test_access_log_tells_an_aborted_stream_from_a_finished_one(nginx, upstream):
    SSE(nginx.port, scenario(tag=tag(), tokens=2)).read_all()
    s = SSE(nginx.port, scenario(tag=tag(), tokens=1000, interval=0.02))
    s.read_until("delta", 2)
    s.close()
    time.sleep(0.3)
    chats = [line for line in nginx.log_lines() if "POST /api/chat" in line]
    finished, aborted = chats[-2], chats[-1]
    assert " 200 " in finished and "completion=OK " in finished
    assert " 200 " in aborted and "completion= " in aborted


def h2_connect(port, tls):
    sock = socket.create_connection(("127.0.0.1", port))
    if tls:  # as browsers do: HTTP/2 chosen by ALPN in the TLS handshake
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        ctx.set_alpn_protocols(["h2"])
        sock = ctx.wrap_socket(sock, server_hostname="localhost")
        assert sock.selected_alpn_protocol() == "h2"
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    return sock, conn


@pytest.fixture(scope="module")
def nginx_h2c(relay, tmp_path_factory):
    proxy = Nginx(tmp_path_factory.mktemp("nginx-h2c"), relay, h2c=True)
    yield proxy
    proxy.stop()


@pytest.mark.parametrize("tls", [True, False], ids=["tls_alpn", "cleartext_prior_knowledge"])
def test_http2_stop_on_one_stream_cancels_only_that_generation(request, relay, upstream, tls):
    proxy = request.getfixturevalue("nginx" if tls else "nginx_h2c")
    sock, conn = h2_connect(proxy.tls_port, tls)
    tags = {}
    for _ in range(3):
        stream_id = conn.get_next_available_stream_id()
        t = tag()
        body = json.dumps(scenario(tag=t, tokens=40, interval=0.05)).encode()
        conn.send_headers(stream_id, [(":method", "POST"), (":path", "/api/chat"), (":scheme", "https"),
                                      (":authority", "localhost"), ("content-type", "application/json"),
                                      ("content-length", str(len(body)))])
        conn.send_data(stream_id, body, end_stream=True)
        tags[stream_id] = t
    sock.sendall(conn.data_to_send())
    victim = min(tags)
    data, ended, reset_at = {sid: b"" for sid in tags}, set(), None
    sock.settimeout(10)
    while ended != set(tags) - {victim}:
        for event in conn.receive_data(sock.recv(65536)):
            if isinstance(event, h2.events.DataReceived):
                data[event.stream_id] += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                ended.add(event.stream_id)
        if reset_at is None and data[victim].count(b"event: delta") >= 3:
            conn.reset_stream(victim, h2.errors.ErrorCodes.CANCEL)  # what a browser does on abort()
            reset_at = time.monotonic()
        sock.sendall(conn.data_to_send())
    sock.close()
    rec = upstream.wait_closed(tags[victim])
    assert rec["closed_at"] is not None and rec["closed_at"] - reset_at < 0.5
    victim_id = json.loads(data[victim].split(b"data: ", 1)[1].split(b"\n", 1)[0])["id"]
    assert relay.wait_finished(victim_id)["cancel_reason"] == "client_disconnect"
    for sid, t in tags.items():
        if sid != victim:
            assert b"event: done" in data[sid] and data[sid].count(b"event: delta") == 40
            assert upstream.record(t)["completed"] is True
