"""The relay over real gunicorn and real sockets: the event contract and each link of the cancel chain."""
import json
import os
import subprocess
import time
import uuid

import pytest

from harness import PYTHON, ROOT, SSE, Server, free_port, full_accept_queue, get_json, open_fds, scenario, texts


def tag():
    return uuid.uuid4().hex[:12]


def test_complete_stream_relays_every_piece_with_usage(relay, upstream):
    t = tag()
    s = SSE(relay.port, scenario(tag=t, tokens=4))
    assert s.status == 200
    assert s.headers["content-type"].startswith("text/event-stream")
    assert s.headers["cache-control"] == "no-cache"
    assert s.headers["x-accel-buffering"] == "no"
    events = [e for e in s.read_all() if e[0] != ":"]
    assert [e[0] for e in events] == ["start", "delta", "delta", "delta", "delta", "done"]
    start, done = events[0][1], events[-1][1]
    assert start["model"] == "gpt-test" and start["id"].startswith("gen_")
    assert texts(events) == "tok0 tok1 tok2 tok3 "
    assert done == {"status": "complete", "finish_reason": "stop",
                    "usage": {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}}
    rec = relay.wait_finished(start["id"])
    assert rec["status"] == "complete" and rec["cancel_reason"] is None
    assert rec["text"] == "tok0 tok1 tok2 tok3 " and rec["chunks"] == 4
    assert rec["upstream_request_id"] == f"up-{t}"
    assert rec["started_at"] <= rec["first_token_at"] <= rec["ended_at"]
    assert rec["started_at"].endswith("Z") and len(rec["started_at"]) == len("2026-01-01T00:00:00.000Z")
    sent = upstream.record(t)
    assert sent["request_body"]["stream"] is True
    assert sent["request_body"]["stream_options"] == {"include_usage": True}
    assert sent["request_headers"]["authorization"] == "Bearer sk-test-SECRET-KEY"
    assert '"generation": "%s", "status": "complete"' % start["id"] in relay.output()


def test_start_is_sent_before_the_upstream_answers(relay, upstream):
    t = tag()
    began = time.monotonic()
    s = SSE(relay.port, scenario(tag=t, header_delay=2))
    kind, data, arrived = s.next()
    assert kind == "start" and arrived - began < 0.5
    assert upstream.record(t).get("headers_sent_at") is None  # maybe not even asked yet
    s.close()


def close_mid_stream(relay, upstream, **kw):
    t = tag()
    s = SSE(relay.port, scenario(tag=t, **kw))
    events = s.read_until("delta", 3)
    gen_id = events[0][1]["id"]
    closed = s.close()
    rec = upstream.wait_closed(t)
    return gen_id, events, closed, rec


@pytest.mark.parametrize("framing", ["chunked", "close"])
def test_client_close_mid_stream_closes_the_upstream_connection(relay, upstream, framing):
    gen_id, events, closed, rec = close_mid_stream(relay, upstream, tokens=500, interval=0.02, framing=framing)
    assert rec["closed_at"] is not None, "the relay kept the upstream connection open"
    assert rec["closed_at"] - closed < 0.5
    # The upstream stopped: it sent little more than what the client had seen.
    assert rec["pieces_sent"] <= 3 + 0.5 / 0.02
    gen = relay.wait_finished(gen_id)
    assert gen["status"] == "cancelled" and gen["cancel_reason"] == "client_disconnect"
    assert gen["text"].startswith(texts(events)) and gen["chunks"] >= 3
    assert gen["ended_at"] is not None


def test_a_provider_deaf_to_our_fin_is_still_cut_off(relay, upstream):
    """Stop's FIN is a request; the kill that follows closes the connection whatever the provider does."""
    gen_id, events, closed, rec = close_mid_stream(relay, upstream, tokens=500, interval=0.02, deaf=True)
    assert rec["closed_at"] is not None and rec["closed_at"] - closed < 0.5
    assert rec["pieces_sent"] <= 3 + 0.5 / 0.02
    assert relay.wait_finished(gen_id)["status"] == "cancelled"


def test_many_providers_deaf_to_our_fin_closed_at_once_are_all_cut_off(relay, upstream):
    """The kills after many Stops at once wait for one idle moment together: each still lands."""
    tags = [tag() for _ in range(20)]
    streams = [SSE(relay.port, scenario(tag=t, tokens=500, interval=0.02, deaf=True)) for t in tags]
    gen_ids = [s.read_until("delta", 2)[0][1]["id"] for s in streams]
    closed = [s.close() for s in streams]
    for t, when in zip(tags, closed):
        rec = upstream.wait_closed(t)
        assert rec["closed_at"] is not None and rec["closed_at"] - when < 1.0, t
    assert {relay.wait_finished(g)["status"] for g in gen_ids} == {"cancelled"}


def test_client_close_while_upstream_has_not_answered(relay, upstream):
    """Link 1: without watching the socket, nothing would notice: no write is pending."""
    t = tag()
    s = SSE(relay.port, scenario(tag=t, header_delay=30))
    kind, data, _ = s.next()
    time.sleep(0.2)  # the relay is now waiting for response headers
    closed = s.close()
    rec = upstream.wait_closed(t)
    assert rec["headers_sent_at"] is None
    assert rec["closed_at"] is not None and rec["closed_at"] - closed < 0.5
    gen = relay.wait_finished(data["id"])
    assert gen["status"] == "cancelled" and gen["cancel_reason"] == "client_disconnect"
    assert gen["chunks"] == 0 and gen["text"] == ""


def test_client_close_during_a_mid_stream_silence(relay, upstream):
    t = tag()
    s = SSE(relay.port, scenario(tag=t, tokens=10, silence_after=2, silence=30))
    events = s.read_until("delta", 2)
    time.sleep(0.2)
    closed = s.close()
    rec = upstream.wait_closed(t)
    assert rec["closed_at"] is not None and rec["closed_at"] - closed < 0.5
    assert relay.wait_finished(events[0][1]["id"])["status"] == "cancelled"


def test_client_close_while_connecting_abandons_the_connect(relay, tmp_path):
    """An upstream whose accept queue is full leaves connect() hanging; Stop must still end it."""
    blackhole, filler = full_accept_queue()
    port = blackhole.getsockname()[1]
    server = Server(tmp_path, LLM_PROVIDER="openai", LLM_BASE_URL=f"http://127.0.0.1:{port}/v1",
                    LLM_MODEL="m", UPSTREAM_CONNECT_TIMEOUT=30)
    try:
        s = SSE(server.port, scenario())
        gen_id = s.next()[1]["id"]
        worker = server.workers()[0]
        time.sleep(0.3)
        assert connections_to(port, worker), "the relay should be stuck connecting"
        s.close()
        gen = server.wait_finished(gen_id)
        assert gen["status"] == "cancelled" and gen["cancel_reason"] == "client_disconnect"
        deadline = time.monotonic() + 2
        while connections_to(port, worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not connections_to(port, worker), "the abandoned connect left a socket open"
    finally:
        server.stop()
        for f in filler:
            f.close()
        blackhole.close()


def connections_to(port, pid):
    """Return the worker's TCP sockets whose remote port is `port`."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    with open(f"/proc/{pid}/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if int(fields[2].split(":")[1], 16) == port and fields[9] in inodes:
                found.append(fields[3])
    return found


def test_keepalive_comments_fill_silences_only(relay, upstream):
    """Link 5: real bytes during silence (KEEPALIVE_SECONDS=0.5), none while pieces flow."""
    s = SSE(relay.port, scenario(tag=tag(), header_delay=1.2, tokens=30, interval=0.02, silence_after=15, silence=1.2))
    events = s.read_all()
    kinds = [e[0] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done"
    first_delta, last_delta = kinds.index("delta"), len(kinds) - 1 - kinds[::-1].index("delta")
    before = kinds[1:first_delta]
    during = kinds[first_delta:last_delta]
    assert before.count(":") == 2, kinds   # 1.2 s of silence before the first piece
    assert during.count(":") == 2, kinds   # 1.2 s of silence after the 15th piece
    assert [e for e in events if e[0] == ":"][0][1] == "keepalive"
    assert texts(events) == "".join(f"tok{i} " for i in range(30))


@pytest.mark.parametrize("framing", ["chunked", "close"])
def test_events_are_relayed_as_they_arrive(relay, upstream, framing):
    """Link 3: a close-delimited body read in fixed blocks would batch these events."""
    s = SSE(relay.port, scenario(tag=tag(), tokens=6, interval=0.15, framing=framing, text="{i}"))
    events = [e for e in s.read_all() if e[0] == "delta"]
    assert [e[1]["text"] for e in events] == ["0", "1", "2", "3", "4", "5"]
    gaps = [b[2] - a[2] for a, b in zip(events, events[1:])]
    assert all(gap > 0.08 for gap in gaps), gaps


@pytest.mark.parametrize("framing", ["chunked", "close"])
def test_a_truncated_event_is_never_relayed(relay, upstream, framing):
    """Link 4: the upstream dies in the middle of an event."""
    s = SSE(relay.port, scenario(tag=tag(), tokens=3, end="truncate", framing=framing))
    events = [e for e in s.read_all() if e[0] != ":"]
    assert [e[0] for e in events] == ["start", "delta", "delta", "delta", "error"]
    assert "GARB" not in json.dumps([e[1] for e in events])
    assert events[-1][1]["type"] == "upstream_disconnected"
    gen = relay.wait_finished(events[0][1]["id"])
    assert gen["status"] == "error" and "GARB" not in gen["text"] and gen["text"] == "tok0 tok1 tok2 "


def test_events_split_across_network_chunks_and_utf8(relay, upstream):
    s = SSE(relay.port, scenario(tag=tag(), tokens=4, text="é€😀{i}", piece_size=3))
    events = s.read_all()
    assert texts(events) == "é€😀0é€😀1é€😀2é€😀3"
    assert events[-1][0] == "done"


@pytest.mark.parametrize("framing", ["chunked", "close"])
def test_pieces_larger_than_the_read_buffer_arrive_whole(relay, upstream, framing):
    """The provider's socket is read through a 1 KB buffer (providers/base.py): 9 KB events pass through it intact."""
    s = SSE(relay.port, scenario(tag=tag(), tokens=3, text="€{i}" * 3000, framing=framing))
    events = s.read_all()
    assert [e[1]["text"] for e in events if e[0] == "delta"] == ["€0" * 3000, "€1" * 3000, "€2" * 3000]
    assert events[-1][0] == "done"


def test_upstream_http_error_becomes_an_error_event_without_the_key(relay, upstream):
    body = json.dumps({"error": {"message": "Incorrect API key provided: sk-test-SECRET-KEY.", "type": "invalid_request_error"}})
    s = SSE(relay.port, scenario(tag=tag(), status=401, error_body=body))
    events = [e for e in s.read_all() if e[0] != ":"]
    assert [e[0] for e in events] == ["start", "error"]
    err = events[1][1]
    assert err["status"] == "error" and err["type"] == "authentication_error"
    assert "401" in err["message"] and "Incorrect API key" in err["message"]
    assert "SECRET" not in json.dumps(err)
    gen = relay.wait_finished(events[0][1]["id"])
    assert gen["status"] == "error" and "SECRET" not in gen["error"]


def test_write_failure_is_the_second_line(relay, upstream):
    """Bytes after the request leave the watcher unsure; the failed write must still stop the upstream."""
    t = tag()
    s = SSE(relay.port, scenario(tag=t, tokens=500, interval=0.02), extra=b"X")
    events = s.read_until("delta", 2)
    closed = s.close()
    rec = upstream.wait_closed(t)
    assert rec["closed_at"] is not None and rec["closed_at"] - closed < 1.0
    gen = relay.wait_finished(events[0][1]["id"])
    assert gen["status"] == "cancelled" and gen["cancel_reason"] == "client_disconnect"


@pytest.mark.parametrize("body, content_type, status, error_type", [
    (b"{not json", "application/json", 400, "invalid_request"),
    (b'{"messages": []}', "application/json", 400, "invalid_request"),
    (b'[1, 2]', "application/json", 400, "invalid_request"),
    (b'{"messages": "hi"}', "application/json", 400, "invalid_request"),
    (b'{"messages": [{"role": "wizard", "content": "hi"}]}', "application/json", 400, "invalid_request"),
    (b'{"messages": [{"role": "user", "content": 5}]}', "application/json", 400, "invalid_request"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "10"}', "application/json", 400, "invalid_request"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', "application/json", 400, "invalid_request"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "id": "no spaces allowed"}', "application/json", 400, "invalid_request"),
    (b'messages=hi', "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
    (b'{"messages": [{"role": "user", "content": "' + b"x" * 1_100_000 + b'"}]}', "application/json", 413, "request_too_large"),
])
def test_bad_requests_get_a_json_error_and_no_generation(relay, body, content_type, status, error_type):
    before = relay.list("limit=1000")["generations"]
    s = SSE(relay.port, None, raw_body=body, content_type=content_type)
    assert s.status == status
    assert s.headers["content-type"] == "application/json"
    length = int(s.headers["content-length"])
    while len(s.buf) < length:
        s._recv()
    error = json.loads(s.buf[:length])["error"]
    assert error["type"] == error_type and error["message"]
    assert relay.list("limit=1000")["generations"] == before


def test_a_client_may_name_its_generation_once(relay, upstream):
    name = "gen_" + tag() + tag()
    events = SSE(relay.port, {"id": name, **scenario(tokens=1)}).read_all()
    assert events[0][1]["id"] == name and relay.wait_finished(name)["status"] == "complete"
    again = SSE(relay.port, {"id": name, **scenario(tokens=1)})
    assert again.status == 409


def test_generation_log_api(relay, upstream):
    ids = []
    for _ in range(3):
        s = SSE(relay.port, scenario(tag=tag(), tokens=1))
        ids.append(s.read_all()[0][1]["id"])
    newest = relay.list("limit=2")["generations"]
    assert [g["id"] for g in newest] == ids[::-1][:2]
    assert set(newest[0]) >= {"id", "status", "cancel_reason", "provider", "model", "started_at", "first_token_at",
                              "ended_at", "chunks", "text", "error", "upstream_request_id"}
    assert get_json(relay.url + "/api/generations/nope")["error"]["type"] == "not_found"
    assert relay.list("limit=x")["error"]["type"] == "invalid_request"
    assert get_json(relay.url + "/healthz")["status"] == "ok"


def test_200_streams_aborted_at_once_close_every_upstream_and_leak_nothing(upstream, tmp_path):
    server = Server(tmp_path, LLM_PROVIDER="openai", LLM_BASE_URL=upstream.url + "/v1", LLM_MODEL="m",
                    KEEPALIVE_SECONDS=5)
    try:
        worker = server.workers()[0]
        SSE(server.port, scenario(tokens=1)).read_all()  # warm up: imports, pools, database
        time.sleep(0.2)
        baseline = open_fds(worker)
        run = tag()
        streams = [SSE(server.port, scenario(tag=f"{run}-{i}", tokens=100000, interval=0.05)) for i in range(200)]
        ids = [s.read_until("delta", 1)[0][1]["id"] for s in streams]
        assert open_fds(worker) >= baseline + 400  # each stream: a client socket and an upstream socket
        closed = [s.close() for s in streams][-1]
        records = [upstream.wait_closed(f"{run}-{i}", timeout=10) for i in range(200)]
        assert all(r["closed_at"] for r in records), "some upstream connections stayed open"
        assert max(r["closed_at"] for r in records) - closed < 3.0
        statuses = {server.wait_finished(i)["status"] for i in ids}
        assert statuses == {"cancelled"}
        deadline = time.monotonic() + 5
        while open_fds(worker) > baseline and time.monotonic() < deadline:
            time.sleep(0.05)
        assert open_fds(worker) <= baseline
    finally:
        server.stop()


def test_a_bad_setting_stops_start_up_and_names_the_variable(tmp_path):
    env = {**os.environ, "BIND": f"127.0.0.1:{free_port()}", "KEEPALIVE_SECONDS": "soon",
           "GENERATIONS_DB": str(tmp_path / "x.db")}
    proc = subprocess.run([PYTHON, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert "KEEPALIVE_SECONDS must be a positive number, got 'soon'" in proc.stderr + proc.stdout
