"""The stop request and the client lease over real gunicorn and SQLite (the embedded default)."""
import os
import signal
import sqlite3
import sys
import time
import uuid

import pytest

from harness import SSE, Server, get_json, poll, post, scenario, texts


def tag():
    return uuid.uuid4().hex[:12]




def stop(server, gen_id):
    return post(f"{server.url}/api/generations/{gen_id}/stop")


@pytest.fixture(scope="module")
def relay2(upstream, tmp_path_factory):
    """Two workers on one SQLite file, as `make run` deploys on one machine."""
    server = Server(tmp_path_factory.mktemp("relay2"), workers=2, LLM_PROVIDER="openai",
                    LLM_BASE_URL=upstream.url + "/v1", LLM_MODEL="m", KEEPALIVE_SECONDS=0.5)
    yield server
    server.stop()


def test_a_stop_request_stops_the_stream_and_the_provider(relay, upstream):
    t = tag()
    s = SSE(relay.port, scenario(tag=t, tokens=1000, interval=0.02))
    gen_id = s.read_until("delta", 3)[0][1]["id"]
    sent = time.monotonic()
    status, body = stop(relay, gen_id)
    assert status == 200 and body["id"] == gen_id
    assert body["status"] == "cancelled" and body["cancel_reason"] == "stop_request"
    rec = upstream.wait_closed(t)
    assert rec["closed_at"] is not None and rec["closed_at"] - sent < 0.5
    # The client is still connected (as behind a proxy that swallowed its abort): it is told.
    rest = [e for e in s.read_all() if e[0] != ":"]
    assert rest[-1][0] == "cancelled" and rest[-1][1] == {"status": "cancelled", "cancel_reason": "stop_request"}
    gen = relay.generation(gen_id)
    assert gen["status"] == "cancelled" and gen["cancel_reason"] == "stop_request"
    assert stop(relay, gen_id) == (200, body | {"lease_expires_at": None})  # idempotent


def test_a_stop_while_the_worker_is_blocked_writing_to_a_slow_client(relay, upstream):
    """A client that stops reading fills the socket: the producer waits inside a write of a large
    event. The stop must wait for that write, not cut it: the client, reading again, gets a
    whole stream ending in `cancelled`, and the log agrees."""
    t = tag()
    s = SSE(relay.port, scenario(tag=t, tokens=200, interval=0.001, pad=300_000))
    gen_id = s.read_until("delta", 1)[0][1]["id"]
    poll(lambda: upstream.record(t).get("pieces_sent", 0), lambda sent: sent >= 10, 10)  # megabytes unread: writes block
    time.sleep(0.3)
    status, body = stop(relay, gen_id)
    assert status == 200 and body["cancel_reason"] == "stop_request"
    rest = [e for e in s.read_all(timeout=20) if e[0] != ":"]  # a cut write would break the chunked framing here
    assert rest[-1][0] == "cancelled", rest[-1][:2]
    assert all(kind == "delta" and len(data["text"]) > 300_000 for kind, data, _ in rest[:-1])
    assert upstream.wait_closed(t)["closed_at"] is not None
    gen = relay.generation(gen_id)
    assert gen["status"] == "cancelled" and gen["cancel_reason"] == "stop_request"


def test_a_stop_landing_on_the_worker_holding_the_stream_acts_at_once(relay, upstream):
    """Not on the next re-check of the store (every 100 ms on SQLite): the worker stops its own stream."""
    delays = []
    for _ in range(9):
        t = tag()
        s = SSE(relay.port, scenario(tag=t, tokens=1000, interval=0.02))
        gen_id = s.read_until("delta", 2)[0][1]["id"]
        sent = time.monotonic()
        stop(relay, gen_id)
        delays.append(upstream.wait_closed(t)["closed_at"] - sent)
        s.close()
    assert sorted(delays)[4] < 0.01, delays


def test_a_stop_in_a_silence_or_before_headers_closes_the_provider(relay, upstream):
    for kw in ({"tokens": 10, "silence_after": 2, "silence": 30}, {"header_delay": 30}):
        t = tag()
        s = SSE(relay.port, scenario(tag=t, **kw))
        gen_id = (s.read_until("delta", 2) if "silence" in kw else [s.next()])[0][1]["id"]
        time.sleep(0.1)
        sent = time.monotonic()
        assert stop(relay, gen_id)[1]["status"] == "cancelled"
        rec = upstream.wait_closed(t)
        assert rec["closed_at"] is not None and rec["closed_at"] - sent < 0.5, kw
        s.close()


def test_a_stop_after_the_end_changes_nothing(relay):
    s = SSE(relay.port, scenario(tokens=3))
    events = s.read_all()
    gen_id = events[0][1]["id"]
    assert events[-1][0] == "done"
    status, body = stop(relay, gen_id)
    assert status == 200 and body["status"] == "complete" and body["cancel_reason"] is None
    gen = relay.generation(gen_id)
    assert gen["status"] == "complete" and gen["text"] == "tok0 tok1 tok2 "


def test_a_stop_before_its_chat_ends_the_chat_at_once_without_the_provider(relay, upstream):
    gen_id, t = "gen_" + uuid.uuid4().hex, tag()
    status, body = stop(relay, gen_id)
    assert status == 202 and body == {"id": gen_id, "status": "pending"}
    s = SSE(relay.port, {"id": gen_id, **scenario(tag=t, tokens=100, interval=0.02)})
    events = [e for e in s.read_all(timeout=2) if e[0] != ":"]
    assert [e[0] for e in events] == ["start", "cancelled"]
    assert upstream.record(t) == {} or "error" in upstream.record(t), "the provider was contacted"
    gen = relay.generation(gen_id)
    assert gen["status"] == "cancelled" and gen["cancel_reason"] == "stop_request" and gen["chunks"] == 0


def test_stops_for_ids_that_never_come_are_forgotten(relay):
    conn = sqlite3.connect(relay.db)
    old = time.time() - 3600
    conn.executemany("INSERT INTO stops (id, reason, requested_at) VALUES (?, 'stop_request', ?)",
                     [(f"gen_never_{i}", old) for i in range(50)])
    conn.commit()
    stop(relay, "gen_" + uuid.uuid4().hex)
    left = conn.execute("SELECT count(*) FROM stops WHERE id LIKE 'gen_never_%'").fetchone()[0]
    conn.close()
    assert left == 0


def test_read_your_writes_the_log_agrees_the_moment_done_is_read(relay):
    for _ in range(10):
        s = SSE(relay.port, scenario(tokens=2, interval=0))
        events = s.read_until("done")
        gen = get_json(f"{relay.url}/api/generations/{events[0][1]['id']}")  # no waiting, no polling
        assert gen["status"] == "complete", gen
        s.close()


def test_a_stop_landing_on_the_other_worker_still_stops_the_stream(relay2, upstream):
    """The holder, frozen while the other worker takes the stop, finds it in the store once it resumes."""
    t = tag()
    s = SSE(relay2.port, scenario(tag=t, tokens=1000, interval=0.02))
    gen_id = s.read_until("delta", 3)[0][1]["id"]
    holder = relay2.generation(gen_id)["worker_pid"]
    assert holder in relay2.workers()
    os.kill(holder, signal.SIGSTOP)  # frozen: the stop can only be taken by the other worker
    try:
        status, body = stop(relay2, gen_id)
        assert status == 200 and body["status"] == "cancelled"
    finally:
        resumed = time.monotonic()
        os.kill(holder, signal.SIGCONT)
    rec = upstream.wait_closed(t)
    assert rec["closed_at"] is not None and rec["closed_at"] - resumed < 0.5
    # The stop request settles the outcome at once; the holder adds the text it relayed when it resumes.
    gen = poll(lambda: relay2.generation(gen_id), lambda rec: rec.get("chunks"), 5)
    assert gen["cancel_reason"] == "stop_request" and gen["text"].startswith("tok0 tok1 tok2 ")
    s.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the wake is an abstract Unix socket (Linux)")
def test_a_stop_taken_by_another_worker_on_sqlite_wakes_the_holder_at_once(upstream, tmp_path):
    """The worker that took the stop wakes the holder's re-check (a datagram): milliseconds, not its 0.5 s period."""
    shared = {"GENERATIONS_DB": str(tmp_path / "shared.db"), "LLM_PROVIDER": "openai",
              "LLM_BASE_URL": upstream.url + "/v1", "LLM_MODEL": "m", "KEEPALIVE_SECONDS": 0.5}
    holder, taker = Server(tmp_path, INSTANCE_ID="a", **shared), Server(tmp_path, INSTANCE_ID="b", **shared)
    try:
        took = []
        for _ in range(5):  # the 0.5 s re-check alone would land under 0.15 s in 5 of 5 with p = 0.3 ** 5
            t = tag()
            s = SSE(holder.port, scenario(tag=t, tokens=1000, interval=0.02))
            gen_id = s.read_until("delta", 3)[0][1]["id"]
            sent = time.monotonic()
            status, body = stop(taker, gen_id)
            assert status == 200 and body["status"] == "cancelled"
            rec = upstream.wait_closed(t)
            assert rec["closed_at"] is not None
            took.append(rec["closed_at"] - sent)
            s.close()
        assert max(took) < 0.15, took
    finally:
        holder.stop()
        taker.stop()


def test_a_lapsed_lease_stops_the_generation(relay2, upstream):
    t = tag()
    began = time.monotonic()
    s = SSE(relay2.port, {"lease_seconds": 1.5, **scenario(tag=t, tokens=1000, interval=0.02)})
    gen_id = s.next()[1]["id"]
    assert relay2.generation(gen_id)["lease_expires_at"] is not None
    rec = upstream.wait_closed(t)
    assert rec["closed_at"] is not None and 1.5 <= rec["closed_at"] - began < 1.5 + 1
    events = [e for e in s.read_all() if e[0] != ":"]
    assert events[-1][0] == "cancelled" and events[-1][1]["cancel_reason"] == "lease_expired"
    gen = relay2.generation(gen_id)
    assert gen["status"] == "cancelled" and gen["cancel_reason"] == "lease_expired"


def test_a_lease_renewed_past_several_periods_survives(relay2, upstream):
    t = tag()
    s = SSE(relay2.port, {"lease_seconds": 1, **scenario(tag=t, tokens=200, interval=0.02)})
    gen_id = s.next()[1]["id"]
    renewals = 0
    deadline = time.monotonic() + 3.5  # 3.5 lease periods
    while time.monotonic() < deadline:
        status, body = post(f"{relay2.url}/api/generations/{gen_id}/lease")
        assert status == 200 and body["status"] == "streaming" and body["lease_expires_at"], body
        renewals += 1
        time.sleep(0.4)
    events = [e for e in s.read_all() if e[0] != ":"]
    assert events[-1][0] == "done" and len([e for e in events if e[0] == "delta"]) == 200
    assert relay2.generation(gen_id)["status"] == "complete"
    status, body = post(f"{relay2.url}/api/generations/{gen_id}/lease")  # after the end: the final status
    assert status == 200 and body["status"] == "complete" and body["lease_expires_at"] is None
    assert post(f"{relay2.url}/api/generations/gen_{uuid.uuid4().hex}/lease")[0] == 404


def test_without_a_lease_nothing_changes(relay2, upstream):
    s = SSE(relay2.port, scenario(tokens=60, interval=0.05))  # 3 s, longer than any lease above
    events = [e for e in s.read_all() if e[0] != ":"]
    assert events[-1][0] == "done"
    assert relay2.generation(events[0][1]["id"])["lease_seconds"] is None


@pytest.mark.parametrize("lease", [0, 0.5, 3601, "10", True])
def test_a_bad_lease_is_a_clear_400(relay, lease):
    status, body = post(f"{relay.url}/api/chat", {"lease_seconds": lease, **scenario()})
    assert status == 400 and body["error"]["type"] == "invalid_request" and "lease_seconds" in body["error"]["message"]
